package uevent

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// msg joins a uevent's header and fields as the kernel sends them.
func msg(fields ...string) []byte { return []byte(strings.Join(fields, "\x00") + "\x00") }

func TestParse(t *testing.T) {
	dmResize := msg("change@/devices/virtual/block/dm-3", "ACTION=change", "DEVPATH=/devices/virtual/block/dm-3",
		"SUBSYSTEM=block", "DM_COOKIE=6291456", "RESIZE=1", "MAJOR=253", "MINOR=3", "DEVNAME=dm-3", "DEVTYPE=disk",
		"DISKSEQ=12", "SEQNUM=4711")
	tests := []struct {
		name string
		in   []byte
		want Event // zero for an error
		dev  uint64
	}{
		{"dm resume with a new size", dmResize, Event{Action: "change", DevPath: "/devices/virtual/block/dm-3", Subsystem: "block", Seq: 4711,
			Vars: map[string]string{"ACTION": "change", "DEVPATH": "/devices/virtual/block/dm-3", "SUBSYSTEM": "block", "DM_COOKIE": "6291456",
				"RESIZE": "1", "MAJOR": "253", "MINOR": "3", "DEVNAME": "dm-3", "DEVTYPE": "disk", "DISKSEQ": "12", "SEQNUM": "4711"}},
			unix.Mkdev(253, 3)},
		{"no device number", msg("change@/devices/virtual/net/lo", "ACTION=change", "DEVPATH=/devices/virtual/net/lo",
			"SUBSYSTEM=net", "INTERFACE=lo", "SEQNUM=9"), Event{Action: "change", DevPath: "/devices/virtual/net/lo", Subsystem: "net", Seq: 9,
			Vars: map[string]string{"ACTION": "change", "DEVPATH": "/devices/virtual/net/lo", "SUBSYSTEM": "net", "INTERFACE": "lo", "SEQNUM": "9"}}, 0},
		{"a value with =", msg("add@/x", "ACTION=add", "DEVPATH=/x", "A=b=c"), Event{Action: "add", DevPath: "/x",
			Vars: map[string]string{"ACTION": "add", "DEVPATH": "/x", "A": "b=c"}}, 0},
		{"empty", nil, Event{}, 0},
		{"no header", msg("ACTION=change", "DEVPATH=/x"), Event{}, 0},
		{"udevd's own messages", append([]byte("libudev\x00\xfe\xed\xca\xfe"), msg("ACTION=change")...), Event{}, 0},
		{"not KEY=VALUE", msg("change@/x", "ACTION=change", "DEVPATH=/x", "junk"), Event{}, 0},
		{"no ACTION", msg("change@/x", "DEVPATH=/x"), Event{}, 0},
		{"bad SEQNUM", msg("change@/x", "ACTION=change", "DEVPATH=/x", "SEQNUM=-1"), Event{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.want.Action == "" {
				if !errors.Is(err, ErrMalformed) {
					t.Errorf("Parse = %+v, %v; want ErrMalformed", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Parse (-want +got):\n%s", diff)
			}
			dev, ok := got.Dev()
			if ok != (tt.dev != 0) || dev != tt.dev {
				t.Errorf("Dev = %d, %v; want %d", dev, ok, tt.dev)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add(msg("change@/devices/virtual/block/dm-3", "ACTION=change", "DEVPATH=/devices/virtual/block/dm-3",
		"SUBSYSTEM=block", "RESIZE=1", "MAJOR=253", "MINOR=3", "SEQNUM=4711"))
	f.Add(msg("add@/x", "ACTION=add", "DEVPATH=/x", "MAJOR=7", "MINOR=x"))
	f.Add([]byte("libudev\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if e.Action == "" || e.DevPath == "" || e.Action != e.Vars["ACTION"] || e.DevPath != e.Vars["DEVPATH"] {
			t.Fatalf("Parse(%q) = %+v", b, e)
		}
		e.Dev()
	})
}

// The kernel's uevents arrive: one asked for by writing "change" to a
// device's uevent file in /sys (the loopback interface's, which every
// machine has), after LastSeq.
func TestListen(t *testing.T) {
	l, err := Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	before, err := LastSeq()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/sys/devices/virtual/net/lo/uevent", []byte("change"), 0); err != nil {
		// As looptest.Require: make test, as root, sets it.
		msg := fmt.Sprintf("asking the kernel for a uevent needs root and a writable /sys: %v", err)
		if os.Getenv("LVNBD_REQUIRE_LOOP") == "1" {
			t.Fatal(msg + " [LVNBD_REQUIRE_LOOP=1 makes this a failure]")
		}
		t.Skip(msg)
	}
	l.SetDeadline(time.Now().Add(30 * time.Second))
	for {
		e, err := l.Next()
		if err != nil {
			t.Fatalf("no uevent for lo: %v", err)
		}
		if e.DevPath != "/devices/virtual/net/lo" {
			continue
		}
		if e.Action != "change" || e.Subsystem != "net" || e.Vars["INTERFACE"] != "lo" || e.Seq <= before {
			t.Errorf("uevent for lo: %+v, want a change of net interface lo after sequence number %d", e, before)
		}
		break
	}
	// A closed listener's Next fails (the server stops its watch so).
	l.Close()
	if _, err := l.Next(); err == nil {
		t.Error("Next on a closed listener: no error")
	}
}
