package guest

import (
	"context"
	"errors"
	"os"
	"testing"
)

func TestParseMdadmVersion(t *testing.T) {
	tests := []struct {
		out  string
		want MdadmVersion
		ok   bool
	}{
		{"mdadm - v4.2 - 2021-12-30\n", MdadmVersion{4, 2}, true},
		{"mdadm - v4.3 - 2024-02-15 - 3\n", MdadmVersion{4, 3}, true}, // EXTRAVERSION
		{"mdadm - v3.4 - 28th January 2016\n", MdadmVersion{3, 4}, true},
		{"mdadm - v4.3-12-gdeadbee - 2024-05-01\n", MdadmVersion{4, 3}, true}, // a git build
		{"mdadm - v4.1-rc1 - 2018-06-21\n", MdadmVersion{4, 1}, true},
		{"mdadm - v10.12 - 2040-01-01\n", MdadmVersion{10, 12}, true},
		{"mdadm: some warning\nmdadm - v4.0 - 2017-01-09\n", MdadmVersion{4, 0}, true}, // a warning first
		{"", MdadmVersion{}, false},
		{"mdadm - 4.2 - 2021-12-30\n", MdadmVersion{}, false},
		{"mdadm - v4 - 2021\n", MdadmVersion{}, false},
		{"mdadm - v12345.1\n", MdadmVersion{}, false},
		{"not mdadm - v4.2\n", MdadmVersion{}, false},
	}
	for _, tt := range tests {
		got, err := ParseMdadmVersion([]byte(tt.out))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseMdadmVersion(%q) = %v, %v; want %v, ok %v", tt.out, got, err, tt.want, tt.ok)
		}
	}
}

func FuzzParseMdadmVersion(f *testing.F) {
	f.Add([]byte("mdadm - v4.2 - 2021-12-30\n"))
	f.Add([]byte("mdadm - v3.4 - 28th January 2016\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := ParseMdadmVersion(b)
		if err != nil {
			if v != (MdadmVersion{}) {
				t.Errorf("error %v with version %v", err, v)
			}
			return
		}
		if v.Major < 0 || v.Minor < 0 || v.Major > 9999 || v.Minor > 9999 {
			t.Errorf("version %v out of range", v)
		}
	})
}

func TestCheckMdadm(t *testing.T) {
	run := errors.New("mdadm is not installed (not on PATH, in /usr/sbin or /sbin)")
	tests := []struct {
		name    string
		out     string
		err     error
		wantErr error // nil: none
		warns   bool
	}{
		{name: "4.2", out: "mdadm - v4.2 - 2021-12-30\n"},
		{name: "4.0", out: "mdadm - v4.0 - 2017-01-09\n"},
		{name: "5.0", out: "mdadm - v5.0 - 2030-01-01\n"},
		{name: "3.4", out: "mdadm - v3.4 - 28th January 2016\n", wantErr: ErrMdadmTooOld},
		{name: "3.9", out: "mdadm - v3.9 - 2030-01-01\n", wantErr: ErrMdadmTooOld},
		{name: "unreadable", out: "mdadm version 7\n", warns: true},
		{name: "missing", err: run, wantErr: run},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, _, _, _, _ := testHost(t)
			h.mdadmVersion = func(context.Context) ([]byte, error) { return []byte(tt.out), tt.err }
			warning, err := h.checkMdadm(context.Background())
			if tt.wantErr == nil && err != nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want %v", err, tt.wantErr)
			}
			if (warning != "") != tt.warns {
				t.Errorf("warning %q, want one: %v", warning, tt.warns)
			}
		})
	}
}

// create and watch refuse to start with an mdadm too old to bring a leg
// back; a version they cannot read is let through, and watch says so.
func TestGuestCommandsCheckMdadm(t *testing.T) {
	old := func(context.Context) ([]byte, error) { return []byte("mdadm - v3.4 - 28th January 2016\n"), nil }
	t.Run("create", func(t *testing.T) {
		h, _, _ := createHost(t) // expects no command
		h.mdadmVersion = old
		_, err := h.create(context.Background(), CreateOptions{Name: "vm1", Devices: [2]string{legA, legB}})
		if !errors.Is(err, ErrMdadmTooOld) {
			t.Errorf("create with mdadm 3.4: %v, want ErrMdadmTooOld", err)
		}
	})
	t.Run("watch", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.w.h.mdadmVersion = old
		if err := e.w.Run(context.Background()); !errors.Is(err, ErrMdadmTooOld) {
			t.Errorf("Run with mdadm 3.4: %v, want ErrMdadmTooOld", err)
		}
		e.wantLogged("watching md arrays", 0)
	})
	t.Run("watch, version unreadable", func(t *testing.T) {
		e := newWatchEnv(t, "sysfs-faulty.txt", WatchConfig{})
		e.probe.set("/dev/nbd0", probeUnreadable)
		e.w.h.mdadmVersion = func(context.Context) ([]byte, error) { return []byte("mdadm 7\n"), nil }
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- e.w.Run(ctx) }()
		<-e.clock.waiting // the first look is done
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		e.wantLogged(`cannot tell mdadm's version (mdadm --version printed "mdadm 7\n": no "mdadm - vX.Y" in it); `+
			"going on as if it were 4.0 or later", 1)
		e.wantLogged("leg does not answer reads; waiting for it", 1)
	})
}

// This machine's mdadm prints its version where mdadmVersionOutput looks
// (on stderr), in the form ParseMdadmVersion reads. make test installs
// mdadm; under LVNBD_REQUIRE_INTEROP=1 (make test) a missing one fails.
func TestMdadmVersionOfThisMachine(t *testing.T) {
	if _, err := lookPath("mdadm"); err != nil {
		if os.Getenv("LVNBD_REQUIRE_INTEROP") == "1" {
			t.Fatalf("%v [LVNBD_REQUIRE_INTEROP=1 makes this a failure; make deps installs mdadm]", err)
		}
		t.Skip(err)
	}
	out, err := mdadmVersionOutput(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	v, err := ParseMdadmVersion(out)
	if err != nil {
		t.Fatal(err)
	}
	if v.Less(minMdadm) {
		t.Errorf("mdadm %s here, older than %s", v, minMdadm)
	}
	t.Logf("mdadm %s", v)
}
