// Package localapi serves and reaches a local, root-only HTTP API on a Unix
// socket: the storage box's control socket and the dom0 daemon's socket.
// The socket's directory is 0700 and the socket 0600, a stale socket of a
// dead process is replaced, and peers other than root and the serving user
// (SO_PEERCRED) are turned away, since both APIs can pull disks from under
// guests.
package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listen opens the socket at path; what names the API in errors (e.g. "is
// lvnbd client already running?" comes from a live socket at path).
func Listen(path, what string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("%s directory: %w", what, err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s %s exists and is not a socket: remove it or choose another path", what, path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s %s is in use by a running process", what, path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing the stale %s %s: %w", what, path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return &peerCheckListener{Listener: ln}, nil
}

// peerCheckListener admits only root and the serving process's own user.
type peerCheckListener struct{ net.Listener }

func (l *peerCheckListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if allowedPeer(c) {
			return c, nil
		}
		c.Close()
	}
}

func allowedPeer(c net.Conn) bool {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return false
	}
	return credErr == nil && cred != nil && (cred.Uid == 0 || int(cred.Uid) == os.Getuid())
}

// Serve answers requests on ln with h until ctx is done, then shuts down,
// giving requests in progress 5 s.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, what string) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	})
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Client is an HTTP client whose every request goes to the socket at path
// (the URL's host is ignored); it connects per request.
func Client(path string) *http.Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &http.Client{Transport: tr}
}

// ErrNotListening means nothing listens on the socket: the daemon is not
// running, or runs with another socket path.
var ErrNotListening = errors.New("nothing listens on the socket")

// StatusError is an answer other than 200 OK, with up to 1 MiB of its body
// for the caller to decode its own error shape from.
type StatusError struct {
	Code int
	Body []byte
}

func (e *StatusError) Error() string { return fmt.Sprintf("HTTP %d", e.Code) }

// Do sends method path to hc's socket, with body as JSON unless it is nil,
// and decodes a 200 answer of at most maxAnswer bytes into out unless out is
// nil. The errors callers tell apart are ErrNotListening and *StatusError.
func Do(ctx context.Context, hc *http.Client, method, path string, body, out any, maxAnswer int64) error {
	var rd io.Reader = bytes.NewReader(nil)
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://lvnbd"+path, rd)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("%w: %w", ErrNotListening, err)
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return &StatusError{Code: resp.StatusCode, Body: b}
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswer)).Decode(out); err != nil {
		return fmt.Errorf("decoding the answer to %s %s: %w", method, path, err)
	}
	return nil
}
