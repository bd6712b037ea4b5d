package pair

import "time"

// Default backoff between attempts to reach a leg's export.
const (
	DefaultMinBackoff = time.Second
	DefaultMaxBackoff = 30 * time.Second
)

// backoff is the wait after the failures-th failed attempt in a row: min,
// doubling with each failure up to max, then spread by ±20% with jitter (a
// number in [0, 1)) so that the dom0s of a cluster do not all redial a
// storage box that comes back at the same instant.
func backoff(failures int, min, max time.Duration, jitter float64) time.Duration {
	d := min
	for i := 1; i < failures && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return time.Duration(float64(d) * (0.8 + 0.4*jitter))
}
