// Package systemd speaks the two small systemd protocols a daemon needs:
// sd_notify (READY=1, RELOADING=1, STOPPING=1, EXTEND_TIMEOUT_USEC to
// $NOTIFY_SOCKET) and socket activation (listeners passed as descriptors 3
// and up with LISTEN_FDS). Both are a few lines over a Unix socket, so no library is pulled in for
// them.
package systemd

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
)

// Notify sends state to the service manager; without $NOTIFY_SOCKET (not run
// by systemd, or Type= is not notify) it does nothing.
func Notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:] // abstract socket
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %q: %w", state, err)
	}
	return nil
}

// Listeners returns the listening sockets systemd passed to this process,
// or nil when it passed none. It unsets the variables so children do not
// take them for their own.
func Listeners() ([]net.Listener, error) {
	defer os.Unsetenv("LISTEN_PID")
	defer os.Unsetenv("LISTEN_FDS")
	defer os.Unsetenv("LISTEN_FDNAMES")
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return nil, nil
	}
	const first = 3 // SD_LISTEN_FDS_START
	var out []net.Listener
	for fd := first; fd < first+n; fd++ {
		syscall.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), "systemd-socket-"+strconv.Itoa(fd))
		ln, err := net.FileListener(f)
		f.Close() // FileListener duplicated it
		if err != nil {
			for _, l := range out {
				l.Close()
			}
			return nil, fmt.Errorf("socket %d from systemd is not a listening socket: %w", fd, err)
		}
		out = append(out, ln)
	}
	return out, nil
}
