package server

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Writes can come the other way (Config.SpliceWrites, off by default): the
// reader splices a write's payload from the socket into a pipe (references to
// the received packets' pages; only bytes the reader had already buffered are
// copied in), and the worker splices the pipe into the file, which copies each
// byte once, into the page cache. A recv into a buffer and a pwrite from it
// copy it twice, but free the packets at once; see Config.SpliceWrites for why
// that is the default.
//
// Reads are sent without copying where the connection and the backend allow:
// a worker splices the data from the file or device into a pipe (the pipe then
// holds references to page-cache pages, and a read from a disk happens here,
// in the worker, not on the connection's one writer), and the writer splices
// the pipe into the socket behind the reply's header. A pread and a send each
// copy every byte once; this path copies none on the server (measured: those
// two copies were 55% of the server's CPU in a sequential read).
//
// Concurrent writes: the pages are the page cache's, so a write landing
// between the splice and the send can show in the reply. NBD makes no
// promise for a read that overlaps a write still in flight, and a write
// issued after the read was answered cannot land before the reply was sent.

// spliceMin is the shortest read sent by splice: shorter replies are batched
// by the writer into one send, which is cheaper than two splices each.
const spliceMin = holeReadMin

// pipeSize is the capacity asked of each pipe. The kernel's default limit for
// a pipe is 1 MiB (/proc/sys/fs/pipe-max-size) for a process without
// CAP_SYS_RESOURCE; one with it gets more.
const pipeSize = 4 << 20

// maxPipesPerConn bounds the pipes (two descriptors each) one connection
// keeps; a read that finds none free is sent by copying.
const maxPipesPerConn = 64

// pipeFullAfter, when positive, makes receive report errPipeFull once it has
// moved that many bytes of a payload: tests reach the fallback with it, which
// real traffic reaches only when packets are small and many.
var pipeFullAfter int

// fileSplicer is a Backend that can move its data into a pipe by reference,
// and write from a pipe.
type fileSplicer interface {
	// SpliceRead moves [off, off+n) into the pipe w, which has room for it.
	SpliceRead(w int, off int64, n int) error
	// SpliceWrite writes n bytes from the pipe r at off and returns how
	// many it wrote.
	SpliceWrite(r int, off int64, n int) (int, error)
}

// splicePipe is a pipe that carries one read's data from the backend to the
// socket.
type splicePipe struct {
	r, w int
	max  int // the longest read it can take without blocking
}

func newSplicePipe() (*splicePipe, error) {
	var fds [2]int
	// The write end blocks (a splice from a file with SPLICE_F_NONBLOCK
	// may give up on data not in the page cache), but is never asked to
	// take more than fits; the read end is non-blocking, as the socket it
	// is spliced into is Go's (a full socket buffer is waited for with the
	// poller).
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	p := &splicePipe{r: fds[0], w: fds[1]}
	if err := unix.SetNonblock(p.r, true); err != nil {
		p.close()
		return nil, fmt.Errorf("pipe: %w", err)
	}
	size, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize)
	if err != nil {
		size, err = unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, 1<<20)
	}
	if err != nil {
		size, err = unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil {
		p.close()
		return nil, fmt.Errorf("pipe size: %w", err)
	}
	// A range that does not start on a page boundary takes one slot
	// (a page) more than its length.
	p.max = size - unix.Getpagesize()
	return p, nil
}

func (p *splicePipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// splicer is one connection's splice path: its socket and its free pipes.
type splicer struct {
	raw     syscall.RawConn
	mu      sync.Mutex
	free    []*splicePipe
	made    int
	closed  bool
	broken  atomic.Bool // splice failed in a way that will not change; stop trying
	lastErr error
}

// newSplicer returns a splice path for nc, or nil when its reads must be
// copied: a TLS connection (the data is encrypted in userspace) or a backend
// that cannot splice.
func newSplicer(nc net.Conn, b Backend) *splicer {
	if _, ok := b.(fileSplicer); !ok {
		return nil
	}
	raw := rawConn(nc) // not a *tls.Conn's: its data is encrypted in userspace
	if raw == nil {
		return nil
	}
	return &splicer{raw: raw}
}

// get returns a free pipe that can take n bytes, or nil.
func (s *splicer) get(n int) *splicePipe {
	if s.broken.Load() {
		return nil
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	if k := len(s.free); k > 0 {
		p := s.free[k-1]
		s.free = s.free[:k-1]
		s.mu.Unlock()
		if n > p.max {
			s.put(p)
			return nil
		}
		return p
	}
	if s.made >= maxPipesPerConn {
		s.mu.Unlock()
		return nil
	}
	s.made++
	s.mu.Unlock()
	p, err := newSplicePipe()
	if err != nil {
		s.fail(err)
		s.mu.Lock()
		s.made--
		s.mu.Unlock()
		return nil
	}
	if n > p.max {
		s.put(p)
		return nil
	}
	return p
}

// put returns an empty pipe for reuse.
func (s *splicer) put(p *splicePipe) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		p.close()
		return
	}
	s.free = append(s.free, p)
}

// discard closes a pipe that may still hold data.
func (s *splicer) discard(p *splicePipe) {
	p.close()
	s.mu.Lock()
	s.made--
	s.mu.Unlock()
}

// fail records an error that means splicing cannot work here at all (the
// kernel or a seccomp filter refuses it); reads are copied from then on.
func (s *splicer) fail(err error) {
	if unsupported(err) || errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
		s.broken.Store(true)
	}
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
}

// close closes the free pipes; pipes still in use are closed when returned.
func (s *splicer) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, p := range s.free {
		p.close()
	}
	s.free = nil
}

// send writes hdr and then n bytes from p to the socket. MSG_MORE keeps the
// header in the segment the data follows in.
func (s *splicer) send(hdr []byte, p *splicePipe, n int) error {
	var opErr error
	err := s.raw.Write(func(fd uintptr) bool {
		for len(hdr) > 0 {
			k, err := unix.SendmsgN(int(fd), hdr, nil, nil, unix.MSG_MORE|unix.MSG_NOSIGNAL)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false // wait until the socket can take more
			case err != nil:
				opErr = fmt.Errorf("send: %w", err)
				return true
			}
			hdr = hdr[k:]
		}
		for n > 0 {
			k, err := unix.Splice(p.r, nil, int(fd), nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false
			case err != nil:
				opErr = fmt.Errorf("splice to socket: %w", err)
				return true
			case k == 0:
				opErr = fmt.Errorf("splice to socket: pipe empty with %d bytes to go", n)
				return true
			}
			n -= int(k)
		}
		return true
	})
	if err != nil {
		return err
	}
	return opErr
}

// errPipeFull: the socket had data the pipe could not take (each received
// packet's piece of a page takes a pipe slot of its own).
var errPipeFull = errors.New("pipe full")

// receive moves a write's n-byte payload into p: first what rr holds, then the
// rest from the socket. On errPipeFull the payload is partly in p and partly
// still on the socket, and moved says how much is in p.
func (s *splicer) receive(rr *requestReader, p *splicePipe, n int) (moved int, err error) {
	for held := rr.takeBuffered(n); len(held) > 0; {
		k, err := unix.Write(p.w, held)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return moved, fmt.Errorf("write to pipe: %w", err)
		}
		held, moved = held[k:], moved+k
	}
	var opErr error
	err = s.raw.Read(func(fd uintptr) bool {
		for moved < n {
			want := n - moved
			if pipeFullAfter > 0 {
				if moved >= pipeFullAfter {
					opErr = errPipeFull
					return true
				}
				want = min(want, pipeFullAfter-moved)
			}
			k, err := unix.Splice(int(fd), nil, p.w, nil, want, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				// Either the socket is empty (wait for it) or the
				// pipe is full (give up on splicing this one).
				if avail, ierr := unix.IoctlGetInt(int(fd), unix.SIOCINQ); ierr == nil && avail > 0 {
					opErr = errPipeFull
					return true
				}
				return false
			case err != nil:
				opErr = fmt.Errorf("splice from socket: %w", err)
				return true
			case k == 0:
				opErr = io.ErrUnexpectedEOF
				return true
			}
			moved += int(k)
		}
		return true
	})
	if err != nil {
		return moved, err
	}
	return moved, opErr
}

// drain reads what p holds into b.
func (p *splicePipe) drain(b []byte) error {
	for len(b) > 0 {
		k, err := unix.Read(p.r, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read from pipe: %w", err)
		}
		if k == 0 {
			return io.ErrUnexpectedEOF
		}
		b = b[k:]
	}
	return nil
}

// unsupported reports an error that says splicing cannot work here at all.
func unsupported(err error) bool {
	return errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM)
}
