package server

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/server/backend"
)

// failedBackend is a backend that failed for good.
type failedBackend struct {
	Backend
	err error
}

func (f failedBackend) Failed() error { return f.err }

var _ failer = (*backend.File)(nil) // the real one says so too

// lvnbd status shows an export whose write-back failed, and why.
func TestStatusShowsAFailedExport(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	broken, _ := fileExport(t, "broken", 1<<20, false)
	broken.Backend = failedBackend{broken.Backend, &backend.WriteBackError{Path: "/dev/vg0/broken", Err: unix.EIO}}
	reg := NewRegistry()
	for _, e := range []*Export{disk, broken} {
		if err := reg.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string]string{}
	for _, st := range reg.Status() {
		got[st.Name] = st.Failed
	}
	if got["disk"] != "" {
		t.Errorf("a working export shows as failed: %s", got["disk"])
	}
	if !strings.Contains(got["broken"], "/dev/vg0/broken") || !strings.Contains(got["broken"], "lvnbd recover") {
		t.Errorf("the failed export's status says %q, want the device and what to do", got["broken"])
	}
}
