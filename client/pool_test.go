package client

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

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

// Round robin picks once per request, so sequential requests of one piece
// each, or of as many pieces as there are connections less one, still
// spread exactly evenly.
func TestPoolSpreadsEvenly(t *testing.T) {
	const block = 4096 // the fake server's maximum payload: one piece
	tests := []struct {
		name   string
		conns  int
		pieces int // per request
		reqs   int
	}{
		{"one piece over 2 connections", 2, 1, 100},
		{"one piece over 3 connections", 3, 1, 99},
		{"two pieces over 3 connections", 3, 2, 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{blockSizes: &BlockSizes{Minimum: 512, Preferred: block, MaxPayload: block},
				exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			p, err := DialPool(testContext(t), s.start(t, "d"), tt.conns, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			ctx := testContext(t)
			buf := make([]byte, tt.pieces*block)
			for i := range tt.reqs {
				if err := p.ReadAt(ctx, buf, int64(i%8*block)); err != nil {
					t.Fatal(err)
				}
			}
			s.mu.Lock()
			var got []int
			for _, n := range s.byConn {
				got = append(got, n)
			}
			s.mu.Unlock()
			even := tt.reqs * tt.pieces / tt.conns
			want := slices.Repeat([]int{even}, tt.conns)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("requests per connection (-want +got):\n%s", diff)
			}
		})
	}
}

// A connection that failed, or is closing because the server said
// ESHUTDOWN on it, gets no more requests while others are usable; when none
// is, requests fail with the last one's error.
func TestPoolSkipsDeadConnections(t *testing.T) {
	const block = 4096
	tests := []struct {
		name string
		// kill answers NBD_CMD_CACHE on the first connection.
		kill func(fc *fakeConn, req nbd.RequestHeader)
		// drain holds a read on the first connection, so that it is
		// still closing (draining) while the test goes on.
		drain bool
	}{
		{name: "server hung up", kill: func(fc *fakeConn, _ nbd.RequestHeader) { fc.nc.Close() }},
		{name: "server said ESHUTDOWN", kill: func(fc *fakeConn, req nbd.RequestHeader) {
			fc.send(fc.errorReply(req, nbd.ESHUTDOWN, "going down"))
		}},
		{name: "draining after ESHUTDOWN", drain: true, kill: func(fc *fakeConn, req nbd.RequestHeader) {
			fc.send(fc.errorReply(req, nbd.ESHUTDOWN, "going down"))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &fakeServer{blockSizes: &BlockSizes{Minimum: 512, Preferred: block, MaxPayload: block},
				exports: map[string]*fakeExport{"d": newFakeExport(1<<20, "")}}
			held := make(chan struct{})
			release := make(chan struct{})
			var releaseOnce sync.Once
			releaseRead := func() { releaseOnce.Do(func() { close(release) }) }
			s.reply = func(fc *fakeConn, req nbd.RequestHeader, _ []byte) bool {
				switch {
				case req.Command == nbd.CmdCache:
					tt.kill(fc, req)
					return true
				case req.Command == nbd.CmdRead && req.Offset == 8*block:
					b := fc.answer(req, nil)
					go func() { <-release; fc.send(b) }()
					close(held)
					return true
				}
				return false
			}
			p, err := DialPool(testContext(t), s.start(t, "d"), 3, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			t.Cleanup(releaseRead) // before Close, which would drain it
			ctx := testContext(t)
			dead := p.conns[0]
			drained := make(chan error, 1)
			if tt.drain {
				go func() { drained <- dead.ReadAt(ctx, make([]byte, block), 8*block) }()
				<-held
			}
			if err := dead.Cache(ctx, 0, block); err == nil {
				t.Fatal("Cache on the connection being killed succeeded")
			}
			if tt.drain {
				// The soft disconnect starts in the background; the
				// held read keeps it draining.
				for dead.usable() == nil {
					runtime.Gosched()
				}
			} else {
				<-dead.Done()
			}
			for i := range 20 {
				if err := p.ReadAt(ctx, make([]byte, block), int64(i%8*block)); err != nil {
					t.Fatalf("read %d with one connection dead: %v", i, err)
				}
			}
			if tt.drain {
				releaseRead()
				if err := <-drained; err != nil {
					t.Errorf("read held over the soft disconnect: %v", err)
				}
			}
			for _, c := range p.conns[1:] {
				c.Close()
			}
			if err := p.ReadAt(ctx, make([]byte, block), 0); !errors.Is(err, ErrClosed) {
				t.Errorf("read with no usable connection: %v, want ErrClosed", err)
			}
			if _, err := p.BlockStatus(ctx, 0, block, 0); !errors.Is(err, ErrClosed) {
				t.Errorf("block status with no usable connection: %v, want ErrClosed", err)
			}
		})
	}
}
