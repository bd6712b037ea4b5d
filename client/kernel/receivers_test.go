package kernel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// fakeProc makes a /proc with one thread per comm.
func fakeProc(t *testing.T, comms ...string) string {
	t.Helper()
	root := t.TempDir()
	for i, comm := range comms {
		dir := filepath.Join(root, strconv.Itoa(100+i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "comm"), []byte(comm+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Not a process.
	if err := os.WriteFile(filepath.Join(root, "uptime"), []byte("1.0 1.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// The threads' names say which of a device's receive loops run, and where;
// the names are Linux's (wq_worker_comm), as the VM suite showed them on
// Debian's 6.1.
func TestCheckReceivers(t *testing.T) {
	tests := []struct {
		name  string
		comms []string
		index int
		n     int
		want  error
	}{
		{"all in workers", []string{"nbd0-recv", "kworker/u4:1+nbd0-recv", "kworker/u4:2+nbd0-recv"}, 0, 2, nil},
		{"one in the rescuer, one in a worker", []string{"nbd0-recv+nbd0-recv", "kworker/u4:2+nbd0-recv"}, 0, 2, nil},
		{"rescuer took them all", []string{"nbd0-recv+nbd0-recv", "kworker/u4:2-events"}, 0, 2, ErrReceiversStarved},
		{"rescuer took three of four", []string{"nbd0-recv+nbd0-recv", "kworker/u4:1+nbd0-recv"}, 0, 4, ErrReceiversStarved},
		{"another device's rescuer", []string{"nbd0-recv", "nbd1-recv+nbd1-recv", "kworker/u4:1+nbd0-recv", "kworker/u4:2+nbd0-recv"}, 0, 2, nil},
		{"nbd10 is not nbd1", []string{"nbd1-recv", "nbd10-recv+nbd10-recv", "kworker/u4:1+nbd1-recv"}, 1, 2, nil}, // slow, not starved
		{"one connection", []string{"nbd0-recv+nbd0-recv"}, 0, 1, nil},
		{"threads named otherwise", []string{"knbd0.0-recv", "knbd0.1-recv"}, 0, 2, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proc := fakeProc(t, tt.comms...)
			start := time.Now()
			err := checkReceivers(context.Background(), proc, tt.index, tt.n, 50*time.Millisecond)
			if !errors.Is(err, tt.want) || (tt.want == nil && err != nil) {
				t.Fatalf("checkReceivers: %v, want %v", err, tt.want)
			}
			if tt.want != nil && time.Since(start) > time.Second {
				t.Errorf("starvation found after %v: it needs no waiting", time.Since(start))
			}
		})
	}
	if err := checkReceivers(context.Background(), "", 0, 2, time.Second); err != nil {
		t.Errorf("without /proc: %v", err)
	}
}
