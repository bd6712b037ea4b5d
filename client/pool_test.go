package client

import (
	"fmt"
	"sync"
	"testing"

	"github.com/lvnbd/lvnbd/nbd"
)

func TestDialPool(t *testing.T) {
	tests := []struct {
		name      string
		multiConn bool
		want      int
	}{
		{"multi-conn export gets every connection", true, 4},
		{"export without multi-conn gets one", false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeExport(8<<20, "")
			if !tt.multiConn {
				e.flags &^= nbd.FlagCanMultiConn
			}
			s := &fakeServer{blockSizes: &BlockSizes{Minimum: 1, Preferred: 4096, MaxPayload: 256 << 10},
				exports: map[string]*fakeExport{"d": e}}
			p, err := DialPool(testContext(t), s.start(t, "d"), 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			if p.Connections() != tt.want || p.MultiConn() != tt.multiConn {
				t.Fatalf("Connections() = %d, MultiConn() = %v; want %d, %v", p.Connections(), p.MultiConn(), tt.want, tt.multiConn)
			}
			var d Device = p
			ctx := testContext(t)
			// One large write spreads its pieces; concurrent small ones too.
			big := pattern(4<<20, 1)
			if err := d.WriteAt(ctx, big, 0, nbd.CmdFlagFUA); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for i := range 8 {
				wg.Go(func() {
					off := int64(4<<20 + i*65536)
					if err := d.WriteAt(ctx, pattern(65536, byte(i)), off, 0); err != nil {
						errs <- err
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if err := d.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4<<20)
			if err := d.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "big", big, got)
			for i := range 8 {
				got := make([]byte, 65536)
				if err := d.ReadAt(ctx, got, int64(4<<20+i*65536)); err != nil {
					t.Fatal(err)
				}
				mustEqual(t, fmt.Sprintf("small %d", i), pattern(65536, byte(i)), got)
			}
			if _, err := d.BlockStatus(ctx, 0, 8<<20, 0); err != nil {
				t.Fatal(err)
			}
			s.mu.Lock()
			used := len(s.byConn)
			s.mu.Unlock()
			if used != tt.want {
				t.Errorf("requests arrived on %d connections, want %d", used, tt.want)
			}
		})
	}
}

// Connections that differ in what a request needs, or in the volume behind
// the name, are not one export.
func TestSameExport(t *testing.T) {
	base := ExportInfo{Size: 1 << 20, Flags: nbd.FlagHasFlags | nbd.FlagCanMultiConn, StructuredReplies: true,
		MetaContexts: []nbd.MetaContext{{ID: 1, Name: "base:allocation"}}, Description: nbd.WithID("volume vm1", "uuid-1")}
	tests := []struct {
		name   string
		change func(*ExportInfo)
		same   bool
	}{
		{"identical", func(*ExportInfo) {}, true},
		{"another description, same ID", func(e *ExportInfo) { e.Description = nbd.WithID("volume vm1 on lvm://vg0", "uuid-1") }, true},
		{"size", func(e *ExportInfo) { e.Size++ }, false},
		{"flags", func(e *ExportInfo) { e.Flags |= nbd.FlagReadOnly }, false},
		{"no base:allocation", func(e *ExportInfo) { e.MetaContexts = nil }, false},
		{"context numbered otherwise", func(e *ExportInfo) { e.MetaContexts = []nbd.MetaContext{{ID: 7, Name: "base:allocation"}} }, true},
		{"volume made anew", func(e *ExportInfo) { e.Description = nbd.WithID("volume vm1", "uuid-2") }, false},
		{"ID gone", func(e *ExportInfo) { e.Description = "volume vm1" }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := base.clone()
			tt.change(&b)
			if got := base.SameExport(b); got != tt.same {
				t.Errorf("SameExport = %v, want %v", got, tt.same)
			}
		})
	}
}
