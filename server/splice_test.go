package server

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"github.com/lvnbd/lvnbd/nbd"
)

// writeFileAt writes data into the file at path at off.
func writeFileAt(t testing.TB, path string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}

// stopAndCountFDs stops the server, closes the export, and checks that no
// descriptor (a pipe, say) outlived them: fdsBefore were open before either.
func stopAndCountFDs(t *testing.T, ts *testServer, disk *Export, fdsBefore int) {
	t.Helper()
	ts.stop(t)
	disk.Backend.Close()
	if n := openFDs(t); n > fdsBefore {
		t.Errorf("%d descriptors open after the server stopped, %d before", n, fdsBefore)
	}
}

// Every read, spliced or copied, simple or structured, returns the file's
// bytes, with many in flight at once (more than a connection has pipes), at
// offsets off page boundaries and with lengths around the pipe's capacity; and
// no pipe outlives its connection.
func TestSplicedReadsReturnTheData(t *testing.T) {
	const size = 40 << 20
	reads := []struct{ off, n uint64 }{
		{0, spliceMin}, {1, spliceMin}, {4095, spliceMin + 1}, {12345, 256 << 10},
		{1 << 20, 1 << 20}, {3<<20 + 7, 1<<20 - 1}, {5 << 20, 4<<20 - 4096}, {9<<20 + 1, 4<<20 - 8192},
		{14 << 20, 8 << 20}, {size - 32<<20, 32 << 20}, {size - spliceMin, spliceMin},
		{100, spliceMin - 1}, {200, 4096},
	}
	for i := range 48 { // more reads than pipes, all in flight together
		reads = append(reads, struct{ off, n uint64 }{uint64(i) * 777 << 10, 128 << 10})
	}
	data := pattern(size, 77)
	for _, structured := range []bool{false, true} {
		for _, splice := range []bool{true, false} {
			t.Run(fmt.Sprintf("structured=%v/splice=%v", structured, splice), func(t *testing.T) {
				fdsBefore := openFDs(t)
				disk, path := fileExport(t, "disk", size, false)
				writeFileAt(t, path, data, 0)
				ts := startServer(t, &Config{NoSplice: !splice}, disk)
				c := dialRaw(t, ts.addr)
				c.open("disk", structured)
				for i, r := range reads {
					c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: uint64(i), Offset: r.off, Length: uint32(r.n)}, nil)
				}
				// A simple reply's length is known only from its
				// handle; replies come in any order, so the raw client
				// peeks at the handle first.
				for range reads {
					res := c.replyFor(func(h uint64) int { return int(reads[h].n) })
					r := reads[res.handle]
					if res.errno != 0 {
						t.Fatalf("read [%d, +%d): %v %s", r.off, r.n, res.errno, res.msg)
					}
					if !bytes.Equal(assemble(t, res, r.off, int(r.n)), data[r.off:r.off+r.n]) {
						t.Fatalf("read [%d, +%d) differs from the file", r.off, r.n)
					}
				}
				spliced := ts.srv.splicedReads.Load()
				if !splice && spliced != 0 {
					t.Errorf("%d reads spliced with splicing off", spliced)
				}
				if splice && spliced < 10 {
					t.Errorf("only %d of %d reads were spliced", spliced, len(reads))
				}
				c.nc.Close()
				stopAndCountFDs(t, ts, disk, fdsBefore)
			})
		}
	}
}

// A client that hangs up with spliced replies still queued leaves no pipe
// behind.
func TestSplicePipesClosedWhenClientVanishes(t *testing.T) {
	fdsBefore := openFDs(t)
	disk, path := fileExport(t, "disk", 64<<20, false)
	writeFileAt(t, path, pattern(64<<20, 3), 0)
	ts := startServer(t, nil, disk)
	for range 4 {
		c := dialRaw(t, ts.addr)
		c.open("disk", false)
		for i := range 64 {
			c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: uint64(i), Offset: uint64(i) << 20, Length: 1 << 20}, nil)
		}
		c.read(nbd.SimpleReplySize) // at least one reply is on its way
		c.nc.Close()
	}
	stopAndCountFDs(t, ts, disk, fdsBefore)
}

// Spliced data cannot be searched for zeroes, so structured reads probe: the
// first read of a connection is searched, reads stay searched while zeroes
// are found, and zeroes that come back after data are found again within
// holeProbeEvery reads.
func TestSplicedReadsStillFindHoles(t *testing.T) {
	const chunk = 64 << 10
	const zone = 32 * chunk // zeroes, then data, then zeroes
	disk, path := fileExport(t, "disk", 3*zone, false)
	writeFileAt(t, path, pattern(zone, 5), zone)
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.open("disk", true)
	handle := uint64(0)
	read := func(off uint64) result {
		t.Helper()
		handle++
		c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: handle, Offset: off, Length: chunk}, nil)
		res := c.reply(0)
		if res.errno != 0 {
			t.Fatalf("read at %d: %v", off, res.errno)
		}
		return res
	}
	for i := range uint64(8) {
		if res := read(i * chunk); len(res.holes) == 0 {
			t.Fatalf("read %d of the zeroes sent no hole", i)
		}
	}
	before := ts.srv.splicedReads.Load()
	for i := range uint64(holeProbeEvery) {
		if res := read(zone + i*chunk); len(res.holes) != 0 {
			t.Fatalf("read %d of the data sent a hole", i)
		}
	}
	if n := ts.srv.splicedReads.Load() - before; n < holeProbeEvery-2 {
		t.Errorf("%d of %d data reads were spliced, want all but the probes", n, holeProbeEvery)
	}
	found := -1
	for i := range holeProbeEvery + 4 {
		res := read(2*zone + uint64(i)*chunk)
		switch {
		case found < 0 && len(res.holes) > 0:
			found = i
		case found >= 0 && len(res.holes) == 0:
			t.Fatalf("read %d of the second zeroes sent no hole, after read %d did", i, found)
		}
	}
	if found < 0 || found >= holeProbeEvery {
		t.Fatalf("zeroes after data: first hole at read %d, want within %d reads", found, holeProbeEvery)
	}
}

// Every write, spliced off the socket or read into a buffer, lands where it
// should: many in flight at once (more than a connection has pipes), at
// offsets off page boundaries, FUA or not, with refused writes in between
// whose payloads must still be consumed, and through the fallback for a pipe
// that fills up.
func TestSplicedWritesLand(t *testing.T) {
	const size = 48 << 20
	type write struct {
		off, n uint64
		fua    bool
	}
	writes := []write{
		{0, spliceMin, false}, {spliceMin + 1, spliceMin - 1, false}, {200 << 10, spliceMin + 3, true},
		{1<<20 + 5, 1 << 20, false}, {3 << 20, 4<<20 - 4096, false}, {8<<20 + 1, 4<<20 - 4096, false},
		{13 << 20, 8 << 20, false}, {28 << 20, 20<<20 - 4096, false}, {size - 100, 100, false},
	}
	// More writes than pipes, all in flight together. None overlaps
	// another: the order of overlapping writes in flight is the server's.
	for i := range 80 {
		writes = append(writes, write{21<<20 + 1 + uint64(i)*(16<<10+spliceMin), 16<<10 + spliceMin, i%7 == 0})
	}
	for _, mode := range []string{"splice", "copy", "pipe full", "default"} {
		t.Run(mode, func(t *testing.T) {
			if mode == "pipe full" {
				pipeFullAfter = 5000
				t.Cleanup(func() { pipeFullAfter = 0 })
			}
			fdsBefore := openFDs(t)
			disk, path := fileExport(t, "disk", size, false)
			// The default receives writes by copying; splicing them
			// is asked for (Config.SpliceWrites).
			ts := startServer(t, &Config{NoSplice: mode == "copy", SpliceWrites: mode == "splice" || mode == "pipe full"}, disk)
			c := dialRaw(t, ts.addr)
			c.open("disk", true)
			want := make([]byte, size)
			handle := uint64(0)
			// A write beyond the end, in the middle of the stream: its
			// payload is consumed, the stream stays in step.
			refused := map[uint64]bool{}
			for i, w := range writes {
				data := pattern(int(w.n), uint64(i))
				copy(want[w.off:], data)
				var flags nbd.CommandFlags
				if w.fua {
					flags = nbd.CmdFlagFUA
				}
				handle++
				c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: flags, Handle: handle, Offset: w.off, Length: uint32(w.n)}, data)
				if i == 4 {
					handle++
					refused[handle] = true
					c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: handle, Offset: size - spliceMin, Length: 2 * spliceMin}, pattern(2*spliceMin, 99))
				}
			}
			for range handle {
				res := c.reply(0)
				if refused[res.handle] {
					if res.errno != nbd.ENOSPC {
						t.Errorf("write beyond the end: %v, want ENOSPC", res.errno)
					}
					continue
				}
				if res.errno != 0 {
					t.Fatalf("write %d: %v %s", res.handle, res.errno, res.msg)
				}
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				for i := range got {
					if got[i] != want[i] {
						t.Fatalf("the file differs from what was written, first at byte %d", i)
					}
				}
			}
			spliced, fallbacks := ts.srv.splicedWrites.Load(), ts.srv.pipeFallbacks.Load()
			switch {
			case mode == "splice" && spliced < int64(len(writes))/2:
				t.Errorf("%d of %d writes were spliced", spliced, len(writes))
			case (mode == "copy" || mode == "default") && spliced+fallbacks != 0:
				t.Errorf("%s: writes are not spliced, yet %d were and %d fell back", mode, spliced, fallbacks)
			case mode == "pipe full" && fallbacks < int64(len(writes))/2:
				// Only a payload the reader already held whole is
				// spliced without reading the socket.
				t.Errorf("pipes always full, yet only %d writes fell back (%d spliced)", fallbacks, spliced)
			}
			c.nc.Close()
			stopAndCountFDs(t, ts, disk, fdsBefore)
		})
	}
}
