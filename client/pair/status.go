package pair

import "time"

// State is what a leg is doing.
type State string

// The states of a leg.
const (
	// StateAttaching: the daemon is making its first attempt to attach or
	// adopt the leg.
	StateAttaching State = "attaching"
	// StateConnected: the leg's device is running with live connections
	// as far as the kernel has told.
	StateConnected State = "connected"
	// StateReconnecting: the device exists (the guest keeps its disk) but
	// connections died; the daemon redials with backoff and hands the
	// kernel new sockets. I/O waits up to the dead timeout, then fails.
	StateReconnecting State = "reconnecting"
	// StateFailed: the leg has no device (the export could not be reached
	// or attached, or the device went away); the daemon retries with
	// backoff.
	StateFailed State = "failed"
	// StateDown: the leg or its pair was taken down (lvnbd pair down): no
	// device, no retries until lvnbd pair up.
	StateDown State = "down"
)

// LegStatus is the state of one leg, as lvnbd pair status shows it.
type LegStatus struct {
	// Leg is "a" or "b".
	Leg string `json:"leg"`
	// URI is the export, canonical; it is also the device's backend
	// identifier, by which a restarted daemon adopts the device.
	URI string `json:"uri"`
	// Link is the stable name, LinkDir/PAIR/LEG, a symlink to Device.
	Link  string `json:"link"`
	State State  `json:"state"`
	// Since is when the leg entered State.
	Since time.Time `json:"since"`
	// Device is /dev/nbdN, empty while the leg has none.
	Device string `json:"device,omitempty"`
	// Size is the device size in bytes.
	Size uint64 `json:"size"`
	// Connections is the number of connections the leg is given.
	Connections int `json:"connections"`
	// Reconnects counts the fresh sets of connections given to the device
	// since the daemon started.
	Reconnects int `json:"reconnects"`
	// Adopted reports that the device was already attached when the daemon
	// started.
	Adopted bool `json:"adopted,omitempty"`
	// LastError is the last failure of an attach, reconnect, health check
	// or size poll, and LastErrorAt when it happened; they stay after the
	// leg recovers.
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// Vdev is the guest's device name for the leg, if configured.
	Vdev string `json:"vdev,omitempty"`
}

// PairStatus is the state of one pair.
type PairStatus struct {
	Name string `json:"name"`
	// Up is false while a leg is down (lvnbd pair down, of the pair or of
	// the leg).
	Up        bool        `json:"up"`
	XenDomain string      `json:"xen_domain,omitempty"`
	Legs      []LegStatus `json:"legs"`
}
