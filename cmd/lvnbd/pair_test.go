package main

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/client/pair"
)

func TestPairXenConfig(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "client.toml")
	writeFile(t, conf, pairTOML("vm1", "nbd://10.0.1.1/vm1", "nbd://10.0.2.1/vm1")+
		"xen_domain = \"guest1\"\nvdevs = [\"xvdb\", \"xvdc\"]\n"+
		pairTOML("vm2", "nbd://10.0.1.1/vm2", "nbd://10.0.2.1/vm2"))
	out, _, err := runCmd(t, newPairCmd(), "xen-config", "--config", conf, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	want := "format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a\n" +
		"format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b\n"
	if out != want {
		t.Errorf("xen-config:\n%s\nwant:\n%s", out, want)
	}
	out, _, err = runCmd(t, newPairCmd(), "xen-config", "--config", conf, "--link-dir", "/run/disks", "vm1")
	if err != nil || !strings.Contains(out, "target=/run/disks/vm1/a\n") {
		t.Errorf("--link-dir: %v\n%s", err, out)
	}
	for args, wantErr := range map[string]string{
		"vm2": "vdevs: missing",
		"vm3": `no such pair "vm3"`,
	} {
		if _, _, err := runCmd(t, newPairCmd(), "xen-config", "--config", conf, args); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("xen-config %s: %v, want an error with %q", args, err, wantErr)
		}
	}
}

func TestPairWithoutDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{{"status"}, {"up", "vm1"}, {"down", "vm1"}} {
		_, _, err := runCmd(t, newPairCmd(), append(args, "--control", sock)...)
		if err == nil || !strings.Contains(err.Error(), "lvnbd client is not running") {
			t.Errorf("%v: %v", args, err)
		}
	}
}

func TestWritePairTable(t *testing.T) {
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	list := []pair.PairStatus{{Name: "vm1", Up: true, Legs: []pair.LegStatus{
		{Leg: "a", URI: "nbd://10.0.1.1:10809/vm1", State: pair.StateConnected, Since: now.Add(-time.Hour),
			Device: "/dev/nbd0", Size: 20 << 30, Connections: 2, Reconnects: 3,
			LastError: "cannot connect to 10.0.1.1:10809: connection refused", LastErrorAt: now.Add(-90 * time.Second)},
		{Leg: "b", URI: "nbd://10.0.2.1:10809/vm1", State: pair.StateFailed, Since: now.Add(-5 * time.Second),
			Connections: 2, LastError: "export \"vm1\" not found", LastErrorAt: now.Add(-5 * time.Second)},
	}}}
	var b strings.Builder
	writePairTable(&b, list, now)
	want := `PAIR  LEG  STATE      SINCE       DEVICE     SIZE    CONNS  RECONNECTS  URI
vm1   a    connected  1h0m0s ago  /dev/nbd0  20 GiB  2      3           nbd://10.0.1.1:10809/vm1
vm1   b    failed     5s ago      -          -       2      0           nbd://10.0.2.1:10809/vm1

Last errors:
  vm1.a, 1m30s ago: cannot connect to 10.0.1.1:10809: connection refused
  vm1.b, 5s ago: export "vm1" not found
`
	if got := b.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}
