package localapi

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
)

func TestServeAndStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "api.sock")
	ln, err := Listen(path, "test socket")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st.Mode(), err)
	}
	if _, err := Listen(path, "test socket"); err == nil {
		t.Fatal("a second listener took a live socket")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), "test socket")
	}()
	resp, err := Client(path).Get("http://local/x")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "ok" {
		t.Fatalf("body %q", body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// A socket file left by a dead process is replaced.
	ln, err = Listen(path, "test socket")
	if err != nil {
		t.Fatal(err)
	}
	ln.(*peerCheckListener).Listener.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if ln, err = Listen(path, "test socket"); err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	ln.Close()
	if err := os.WriteFile(filepath.Join(filepath.Dir(path), "plain"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(filepath.Dir(path), "plain"), "test socket"); err == nil {
		t.Fatal("Listen replaced a file that is not a socket")
	}
}
