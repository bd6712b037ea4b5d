package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/guest"
)

// runGuest runs `lvnbd guest ARGS...` against deps and returns stdout,
// stderr and the error.
func runGuest(t *testing.T, deps *guestDeps, args ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := newGuestCmd(deps)
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	cmd.SetArgs(args)
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	err := cmd.ExecuteContext(context.Background())
	return stdout.String(), stderr.String(), err
}

// noGuest fails the test on any call to the machine.
func noGuest(t *testing.T) *guestDeps {
	return &guestDeps{
		create: func(context.Context, guest.CreateOptions) (guest.Created, error) {
			t.Error("unexpected create")
			return guest.Created{}, errors.New("unexpected")
		},
		status: func() ([]guest.ArrayStatus, error) {
			t.Error("unexpected status")
			return nil, errors.New("unexpected")
		},
		watch: func(context.Context, *guest.WatchConfig) error {
			t.Error("unexpected watch")
			return errors.New("unexpected")
		},
	}
}

func TestGuestCreate(t *testing.T) {
	deps := noGuest(t)
	var got guest.CreateOptions
	deps.create = func(_ context.Context, opts guest.CreateOptions) (guest.Created, error) {
		got = opts
		return guest.Created{Path: "/dev/md/data", Overwritten: []string{"/dev/xvdb: ext2/3/4 filesystem"}}, nil
	}
	stdout, stderr, err := runGuest(t, deps, "create", "--name", "data", "--filesystem", "ext4", "--force",
		"--bitmap-chunk", "16M", "/dev/xvdb", "/dev/xvdc")
	if err != nil {
		t.Fatal(err)
	}
	want := guest.CreateOptions{Name: "data", Devices: [2]string{"/dev/xvdb", "/dev/xvdc"}, Filesystem: "ext4", Force: true, BitmapChunk: 16 << 20}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("options (-want +got):\n%s", diff)
	}
	if stdout != "/dev/md/data\n" {
		t.Errorf("stdout %q", stdout)
	}
	if stderr != "lvnbd: --force: overwrote: /dev/xvdb: ext2/3/4 filesystem\n" {
		t.Errorf("stderr %q", stderr)
	}
}

func TestGuestCreateErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		say  string
	}{
		{[]string{"create", "/dev/xvdb", "/dev/xvdc"}, "--name is required"},
		{[]string{"create", "--name", "x", "/dev/xvdb"}, "accepts 2 arg(s)"},
		{[]string{"create", "--name", "x", "--bitmap-chunk", "lots", "/dev/xvdb", "/dev/xvdc"}, "--bitmap-chunk"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, _, err := runGuest(t, noGuest(t), tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.say) {
				t.Errorf("error %v, want %q", err, tt.say)
			}
		})
	}
	deps := noGuest(t)
	deps.create = func(context.Context, guest.CreateOptions) (guest.Created, error) {
		return guest.Created{}, guest.ErrHasData
	}
	if _, _, err := runGuest(t, deps, "create", "--name", "x", "/dev/xvdb", "/dev/xvdc"); !errors.Is(err, guest.ErrHasData) {
		t.Errorf("create error not passed on: %v", err)
	}
}

var sampleArrays = []guest.ArrayStatus{{
	Name: "data", Path: "/dev/md/data", Device: "/dev/md127", Level: "raid1", Health: "recovering", State: "clean",
	RaidDisks: 2, Degraded: 1, Size: 63 << 20, ComponentSize: 63 << 20, Bitmap: "internal",
	Sync: &guest.SyncStatus{Action: "recover", Done: 10 << 20, Total: 63 << 20, Percent: 15.8, Finish: "0.6min", Speed: "1296K/sec"},
	Members: []guest.MemberStatus{
		{Device: "/dev/xvdb", Slot: 0, State: []string{"spare", "failfast"}, Size: 63 << 20},
		{Device: "/dev/xvdc", Slot: 1, State: []string{"in_sync", "failfast"}, Size: 63 << 20},
	},
}}

func TestGuestStatus(t *testing.T) {
	deps := noGuest(t)
	deps.status = func() ([]guest.ArrayStatus, error) { return sampleArrays, nil }
	stdout, _, err := runGuest(t, deps, "status")
	if err != nil {
		t.Fatal(err)
	}
	want := `ARRAY         DEVICE      SIZE    HEALTH      SYNC
/dev/md/data  /dev/md127  63 MiB  recovering  recover 15.8%, 0.6min left
  leg /dev/xvdb  slot 0  63 MiB  spare,failfast
  leg /dev/xvdc  slot 1  63 MiB  in_sync,failfast
`
	if diff := cmp.Diff(want, stdout); diff != "" {
		t.Errorf("table (-want +got):\n%s", diff)
	}

	// An array whose state cannot be read is shown with why.
	deps.status = func() ([]guest.ArrayStatus, error) {
		return append([]guest.ArrayStatus{{Name: "md125", Path: "/dev/md125", Device: "/dev/md125", Level: "raid5",
			Health: "unknown", Members: []guest.MemberStatus{}, Problem: "raid_disks: \"4 (3)\""}}, sampleArrays...), nil
	}
	stdout, _, err = runGuest(t, deps, "status")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout, "/dev/md125  /dev/md125  0 B   unknown  -\n  cannot read its state: raid_disks: \"4 (3)\"\n") {
		t.Errorf("an unreadable array:\n%s", stdout)
	}
	deps.status = func() ([]guest.ArrayStatus, error) { return sampleArrays, nil }

	stdout, _, err = runGuest(t, deps, "status", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Arrays []guest.ArrayStatus `json:"arrays"`
	}
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("%v in %s", err, stdout)
	}
	if diff := cmp.Diff(sampleArrays, got.Arrays); diff != "" {
		t.Errorf("json (-want +got):\n%s", diff)
	}
	for _, key := range []string{`"health": "recovering"`, `"percent": 15.8`, `"slot": 0`, `"state": [`} {
		if !strings.Contains(stdout, key) {
			t.Errorf("json lacks %s:\n%s", key, stdout)
		}
	}

	deps.status = func() ([]guest.ArrayStatus, error) { return nil, nil }
	if stdout, _, _ = runGuest(t, deps, "status", "--json"); strings.TrimSpace(stdout) != "{\n  \"arrays\": []\n}" {
		t.Errorf("no arrays, json: %q", stdout)
	}
	if stdout, _, _ = runGuest(t, deps, "status"); stdout != "no md arrays\n" {
		t.Errorf("no arrays, table: %q", stdout)
	}
}

func TestGuestWatch(t *testing.T) {
	deps := noGuest(t)
	var got *guest.WatchConfig
	deps.watch = func(_ context.Context, cfg *guest.WatchConfig) error {
		got = cfg
		return nil
	}
	if _, _, err := runGuest(t, deps, "watch", "--md", "/dev/md/a", "--md", "/dev/md/b", "--grow-fs", "--interval", "5s",
		"--log-level", "error"); err != nil {
		t.Fatal(err)
	}
	if got == nil || got.Log == nil {
		t.Fatal("watch got no config or no logger")
	}
	if diff := cmp.Diff([]string{"/dev/md/a", "/dev/md/b"}, got.Arrays); diff != "" || !got.GrowFS || got.Interval != 5*time.Second {
		t.Errorf("config %+v", got)
	}
	for _, bad := range [][]string{{"watch", "--interval", "0s"}, {"watch", "--log-level", "loud"}, {"watch", "extra"}} {
		if _, _, err := runGuest(t, noGuest(t), bad...); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

// guest status --check: exit status 1 unless every array is healthy, after
// the same output; without it, 0 whatever the arrays' health.
func TestGuestStatusCheck(t *testing.T) {
	healthy := guest.ArrayStatus{Name: "data", Path: "/dev/md/data", Device: "/dev/md127", Level: "raid1",
		Health: "healthy", Members: []guest.MemberStatus{}}
	degraded := healthy
	degraded.Name, degraded.Path, degraded.Device, degraded.Health = "logs", "/dev/md/logs", "/dev/md126", "degraded"
	for _, tc := range []struct {
		name   string
		arrays []guest.ArrayStatus
		want   int // exit status with --check
	}{
		{"all healthy", []guest.ArrayStatus{healthy}, 0},
		{"one degraded", []guest.ArrayStatus{healthy, degraded}, 1},
		{"no arrays", nil, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			deps := noGuest(t)
			deps.status = func() ([]guest.ArrayStatus, error) { return tc.arrays, nil }
			for _, args := range [][]string{{"status", "--check"}, {"status", "--check", "--json"}} {
				stdout, _, err := runGuest(t, deps, args...)
				var code exitCode
				if errors.As(err, &code) {
					err = nil
				}
				if err != nil || int(code) != tc.want {
					t.Errorf("%v: exit %d, %v; want exit %d", args, code, err, tc.want)
				}
				if stdout == "" {
					t.Errorf("%v: no output", args)
				}
			}
			if _, _, err := runGuest(t, deps, "status"); err != nil {
				t.Errorf("without --check: %v", err)
			}
		})
	}
}
