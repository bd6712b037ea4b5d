package server

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

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
const maxPipesPerConn = 32

// fileSplicer is a Backend that can move its data into a pipe by reference.
type fileSplicer interface {
	// SpliceRead moves [off, off+n) into the pipe w, which has room for it.
	SpliceRead(w int, off int64, n int) error
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
	sc, ok := nc.(syscall.Conn) // *net.TCPConn, *net.UnixConn; not *tls.Conn
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
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
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
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
