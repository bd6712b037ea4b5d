package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/volume"
)

func (c *volumeCLI) snapshotsJSON(args ...string) []volume.Snapshot {
	c.t.Helper()
	var got struct {
		Snapshots []volume.Snapshot `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(c.ok(append([]string{"snapshot", "list", "--json"}, args...)...)), &got); err != nil {
		c.t.Fatal(err)
	}
	return got.Snapshots
}

func TestSnapshotCommands(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "vm1", "--size", "16M")
	c.ok("volume", "create", "vm2", "--size", "1M")
	img := filepath.Join(c.dir, "vm1.img")
	writeImage(t, img, "original")

	out := c.ok("snapshot", "create", "vm1")
	m := regexp.MustCompile(`^created snapshot (vm1@\d{8}T\d{6}Z): 16 MiB, read-only at (\S+)\n$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("snapshot create vm1 printed %q", out)
	}
	auto := m[1]
	if m[2] != filepath.Join(c.dir, auto+".img") {
		t.Errorf("snapshot path %s", m[2])
	}
	c.ok("snapshot", "create", "vm1@before-upgrade", "--size", "1G")
	c.ok("snapshot", "create", "vm2@x")
	writeImage(t, img, "upgraded")

	snaps := c.snapshotsJSON()
	var refs []string
	for _, s := range snaps {
		refs = append(refs, s.Ref())
	}
	if want := []string{auto, "vm1@before-upgrade", "vm2@x"}; strings.Join(refs, " ") != strings.Join(want, " ") {
		t.Errorf("snapshot list --json = %v, want %v", refs, want)
	}
	if s := c.snapshotsJSON("vm2"); len(s) != 1 || s[0].Ref() != "vm2@x" {
		t.Errorf("snapshot list --json vm2 = %+v", s)
	}
	table := c.ok("snapshot", "list")
	for _, want := range []string{"SNAPSHOT", "COW", "USED", "STATE", "vm1@before-upgrade", "16 MiB", "ok"} {
		if !strings.Contains(table, want) {
			t.Errorf("snapshot list does not show %q:\n%s", want, table)
		}
	}
	if v := c.listJSON(); len(v[0].Snapshots) != 2 {
		t.Errorf("volume list shows %d snapshots of vm1, want 2", len(v[0].Snapshots))
	}

	if out := c.ok("snapshot", "merge", "vm1@before-upgrade"); out != "merged snapshot vm1@before-upgrade into vm1, and removed it\n" {
		t.Errorf("merge printed %q", out)
	}
	if got := readImage(t, img, 8); got != "original" {
		t.Errorf("vm1 after the merge starts %q, want %q", got, "original")
	}
	if out := c.ok("snapshot", "remove", auto); out != "removed snapshot "+auto+"\n" {
		t.Errorf("remove printed %q", out)
	}
	c.ok("snapshot", "remove", "vm2@x")
	if out := c.ok("snapshot", "list"); !strings.HasPrefix(out, "no snapshots in ") {
		t.Errorf("list of nothing printed %q", out)
	}
}

func TestSnapshotErrors(t *testing.T) {
	c := newVolumeCLI(t)
	c.ok("volume", "create", "vm1", "--size", "1M")
	c.ok("snapshot", "create", "vm1@s")
	tests := []struct {
		args []string
		is   error
		text string
	}{
		{[]string{"snapshot", "create", "vm1@s"}, volume.ErrExists, "vm1@s already exists"},
		{[]string{"snapshot", "create", "vm1@bad name"}, volume.ErrInvalidName, "bad name"},
		{[]string{"snapshot", "create", "vm1@a@b"}, volume.ErrInvalidName, ""},
		{[]string{"snapshot", "create", "nope"}, volume.ErrNotFound, "volume nope not found"},
		{[]string{"snapshot", "create", "vm1", "--size", "big"}, volume.ErrInvalidSize, "--size"},
		{[]string{"snapshot", "remove", "vm1"}, volume.ErrInvalidName, "want VOLUME@SNAPSHOT"},
		{[]string{"snapshot", "remove", "vm1@nope"}, volume.ErrNotFound, "snapshot vm1@nope not found"},
		{[]string{"snapshot", "merge", "vm1@"}, volume.ErrInvalidName, ""},
		{[]string{"snapshot", "merge", "nope@s"}, volume.ErrNotFound, "nope"},
		{[]string{"snapshot", "list", "nope"}, volume.ErrNotFound, "nope"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := c.run(tt.args...)
			if err == nil || !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.text) {
				t.Errorf("error = %v, want %v saying %q", err, tt.is, tt.text)
			}
		})
	}
}

func writeImage(t testing.TB, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(s), 0); err != nil {
		t.Fatal(err)
	}
}

func readImage(t testing.TB, path string, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return string(b)
}
