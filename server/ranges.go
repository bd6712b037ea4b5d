package server

import "sync"

// rangeLock orders the writes to one export that overlap: a write holds its
// byte range for its I/O, and a later write over any of those bytes waits for
// it. Without it two overlapping writes in flight at once land in either
// order, and one the client has given up on (see writeVerdict) could land
// after the newer write it was resent behind, on any backend: the page cache
// orders neither pwrite, and a block device may complete queued writes in
// any order.
//
// Writes that overlap are rare (a client waits for one before it sends the
// next over the same blocks), so the ranges held are a short list, scanned
// in full: at most one per worker of every connection to the export.
type rangeLock struct {
	mu      sync.Mutex
	freed   sync.Cond // broadcast when a range is let go and someone waits
	held    []span
	waiting int
	// waitHook, when a test sets it, is called each time a write finds
	// its range held and waits.
	waitHook func()
}

// span is a held range of bytes, [off, end).
type span struct{ off, end int64 }

func (s span) overlaps(o span) bool { return s.off < o.end && o.off < s.end }

// lock waits until no held range overlaps [off, end), then holds it. An
// empty range holds nothing.
func (l *rangeLock) lock(off, end int64) span {
	s := span{off, end}
	if off >= end {
		return s
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.overlapsLocked(s) {
		if l.freed.L == nil {
			l.freed.L = &l.mu
		}
		if l.waitHook != nil {
			l.waitHook()
		}
		l.waiting++
		l.freed.Wait()
		l.waiting--
	}
	l.held = append(l.held, s)
	return s
}

// tryLock holds [off, end) if no held range overlaps it, without waiting.
func (l *rangeLock) tryLock(off, end int64) (span, bool) {
	s := span{off, end}
	if off >= end {
		return s, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.overlapsLocked(s) {
		return s, false
	}
	l.held = append(l.held, s)
	return s, true
}

// unlock lets go of a range that lock or tryLock returned.
func (l *rangeLock) unlock(s span) {
	if s.off >= s.end {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, h := range l.held {
		// Held ranges never overlap, so none other equals s.
		if h == s {
			last := len(l.held) - 1
			l.held[i] = l.held[last]
			l.held = l.held[:last]
			break
		}
	}
	if l.waiting > 0 {
		l.freed.Broadcast()
	}
}

func (l *rangeLock) overlapsLocked(s span) bool {
	for _, h := range l.held {
		if h.overlaps(s) {
			return true
		}
	}
	return false
}
