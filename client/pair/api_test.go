package pair

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// serveAPI runs s and its API on a socket in a temporary directory.
func serveAPI(t *testing.T, s *Supervisor) *Client {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "client.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", st.Mode(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { s.Run(ctx); done <- struct{}{} }()
	go func() {
		if err := Serve(ctx, ln, Handler(s, zaptest.NewLogger(t))); err != nil {
			t.Errorf("Serve: %v", err)
		}
		done <- struct{}{}
	}()
	t.Cleanup(func() { cancel(); <-done; <-done })
	return NewClient(path)
}

func TestAPI(t *testing.T) {
	k := newFakeKernel(t)
	st := newFakeStorage(t, map[string]uint64{uriA: 64 * mib, uriB: 64 * mib})
	s := newTestSupervisor(t, []Spec{testSpec()}, k, st, nil)
	c := serveAPI(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Up waits for both legs to be attached.
	ps, err := c.Up(ctx, "vm1", "", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if !ps.Up || len(ps.Legs) != 2 || ps.Legs[0].Device == "" || ps.Legs[1].Device == "" {
		t.Fatalf("up: %+v", ps)
	}
	list, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "vm1" || list[0].Legs[0].State != StateConnected ||
		list[0].Legs[1].URI != backendB || list[0].Legs[0].Link != LinkPath(s.cfg.LinkDir, "vm1", "a") ||
		list[0].Legs[0].Connections != 2 || list[0].Legs[0].Size != 64*mib {
		t.Errorf("status: %+v", list)
	}

	// One leg only.
	ps, err = c.Down(ctx, "vm1", "b", false)
	if err != nil || ps.Up || ps.Legs[0].State != StateConnected || ps.Legs[1].State != StateDown {
		t.Errorf("down of leg b: %+v, %v", ps, err)
	}
	if _, err := c.Up(ctx, "vm1", "c", time.Minute); !errors.Is(err, ErrUnknownLeg) || !strings.Contains(err.Error(), `no such leg "c"`) {
		t.Errorf("up of leg c: %v", err)
	}
	// A leg as a parameter of the pair's route is refused, not ignored.
	if err := c.do(ctx, http.MethodPost, "/v1/pairs/vm1/down?leg=a", nil); err == nil || !strings.Contains(err.Error(), "not a parameter") {
		t.Errorf("down with leg=a on the pair's route: %v", err)
	}

	ps, err = c.Down(ctx, "vm1", "", false)
	if err != nil {
		t.Fatal(err)
	}
	if ps.Up || ps.Legs[0].State != StateDown || ps.Legs[0].Device != "" {
		t.Errorf("down: %+v", ps)
	}

	_, err = c.Down(ctx, "nope", "", false)
	if !errors.Is(err, ErrUnknownPair) || !strings.Contains(err.Error(), `no such pair "nope"`) {
		t.Errorf("down nope: %v", err)
	}
	// A failure returns the pair's state with the error.
	st.set(uriA, func(e *fakeExport) { e.down = true })
	ps, err = c.Up(ctx, "vm1", "", time.Minute)
	var re *RemoteError
	if !errors.As(err, &re) || re.Pair == nil || re.Pair.Legs[0].State != StateFailed ||
		!strings.Contains(err.Error(), "leg a ("+backendA+") has no device") {
		t.Errorf("up with a dead leg: %v (%+v)", err, re)
	}
	if ps.Legs != nil {
		t.Errorf("up with a dead leg returned %+v with the error", ps)
	}
}

func TestClientWithoutDaemon(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "none.sock"))
	if _, err := c.Status(context.Background()); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("status: %v, want ErrNoDaemon", err)
	}
}

// A daemon from before the legs' routes answers one with a bare 404: the
// client says so, and nothing is taken down.
func TestLegRouteOnAnOlderDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "old.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	downs := 0
	// The older daemon's pair route, which ignores a leg.
	mux.HandleFunc("POST /v1/pairs/{name}/down", func(w http.ResponseWriter, r *http.Request) {
		downs++
		writeJSON(w, http.StatusOK, PairStatus{Name: r.PathValue("name")})
	})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, mux) }()
	defer func() {
		cancel()
		<-served
	}()
	_, err = NewClient(sock).Down(context.Background(), "vm1", "a", false)
	if err == nil || !strings.Contains(err.Error(), "does not take one leg at a time") {
		t.Errorf("down --leg a on an older daemon: %v", err)
	}
	if downs != 0 {
		t.Errorf("the older daemon took the pair down %d times", downs)
	}
}
