package pair

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/internal/localapi"
)

// DefaultSocket is where lvnbd client listens for lvnbd pair commands.
const DefaultSocket = "/run/lvnbd/client.sock"

// DefaultUpWait is how long Up waits for the legs when the request does not
// say.
const DefaultUpWait = time.Minute

// ErrNoDaemon means nothing listens on the socket: lvnbd client is not
// running (or was started with another --control path).
var ErrNoDaemon = errors.New("lvnbd client is not running")

// The API, HTTP with JSON bodies on the Unix socket:
//
//	GET  /v1/pairs                            []PairStatus
//	POST /v1/pairs/{name}/up?wait=DURATION               PairStatus
//	POST /v1/pairs/{name}/down[?force=1]                 PairStatus
//	POST /v1/pairs/{name}/legs/{leg}/up?wait=DURATION    PairStatus
//	POST /v1/pairs/{name}/legs/{leg}/down[?force=1]      PairStatus
//
// The legs/{leg} routes act on that leg (a or b) only. They are routes of
// their own, not a parameter, so that a daemon from before them answers 404
// instead of taking both legs down.
//
// A failure is a non-200 status with an apiError body; up and down return
// the pair's status with it when they got that far.
type apiError struct {
	Error string      `json:"error"`
	Kind  string      `json:"kind,omitempty"` // "unknown_pair", "unknown_leg"
	Pair  *PairStatus `json:"pair,omitempty"`
}

// Handler serves the supervisor's API.
func Handler(s *Supervisor, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/pairs", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Status())
	})
	up := func(w http.ResponseWriter, r *http.Request) {
		wait := DefaultUpWait
		if v := r.URL.Query().Get("wait"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				writeJSON(w, http.StatusBadRequest, apiError{Error: fmt.Sprintf("wait=%q: want a duration such as 60s", v)})
				return
			}
			wait = d
		}
		leg := r.PathValue("leg") // "" on the pair's route: both
		st, err := s.Up(r.Context(), r.PathValue("name"), leg, wait)
		log.Info("pair up", zap.String("pair", r.PathValue("name")), zap.String("leg", leg), zap.Error(err))
		writeResult(w, st, err)
	}
	down := func(w http.ResponseWriter, r *http.Request) {
		leg := r.PathValue("leg")
		st, err := s.Down(r.Context(), r.PathValue("name"), leg, r.URL.Query().Get("force") == "1")
		log.Info("pair down", zap.String("pair", r.PathValue("name")), zap.String("leg", leg), zap.Error(err))
		writeResult(w, st, err)
	}
	// A leg named as a parameter is refused, not ignored: acting on the
	// whole pair instead would take the other leg from the guest too.
	pairOnly := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Query().Has("leg") {
				writeJSON(w, http.StatusBadRequest, apiError{Error: "leg= is not a parameter: POST /v1/pairs/NAME/legs/LEG/up or down acts on one leg"})
				return
			}
			h(w, r)
		}
	}
	mux.HandleFunc("POST /v1/pairs/{name}/up", pairOnly(up))
	mux.HandleFunc("POST /v1/pairs/{name}/down", pairOnly(down))
	mux.HandleFunc("POST /v1/pairs/{name}/legs/{leg}/up", up)
	mux.HandleFunc("POST /v1/pairs/{name}/legs/{leg}/down", down)
	return mux
}

func writeResult(w http.ResponseWriter, st PairStatus, err error) {
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, st)
	case errors.Is(err, ErrUnknownPair):
		writeJSON(w, http.StatusNotFound, apiError{Error: err.Error(), Kind: "unknown_pair"})
	case errors.Is(err, ErrUnknownLeg):
		writeJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Kind: "unknown_leg"})
	default:
		writeJSON(w, http.StatusInternalServerError, apiError{Error: err.Error(), Pair: &st})
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// Listen opens the daemon's socket at path: its directory is created 0700,
// the socket made 0600, a stale socket of a dead daemon replaced, and
// connections from users other than root and the daemon's own refused.
func Listen(path string) (net.Listener, error) { return localapi.Listen(path, "lvnbd client socket") }

// Serve answers API requests on ln until ctx is done, then closes ln.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	return localapi.Serve(ctx, ln, h, "lvnbd client socket")
}

// Client talks to a running lvnbd client daemon.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the daemon's socket at path; it connects
// per request.
func NewClient(path string) *Client {
	return &Client{path: path, hc: localapi.Client(path)}
}

// RemoteError is a failure the daemon reported. Pair is the pair's state
// after a failed Up or Down, when known.
type RemoteError struct {
	Msg  string
	Pair *PairStatus
	kind string
}

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap returns ErrUnknownPair for an unknown pair, ErrUnknownLeg for an
// unknown leg.
func (e *RemoteError) Unwrap() error {
	switch e.kind {
	case "unknown_pair":
		return ErrUnknownPair
	case "unknown_leg":
		return ErrUnknownLeg
	}
	return nil
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	err := localapi.Do(ctx, c.hc, method, path, nil, out, 16<<20)
	var se *localapi.StatusError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, localapi.ErrNotListening):
		return fmt.Errorf("%w (no daemon on %s)", ErrNoDaemon, c.path)
	case errors.As(err, &se):
		var ae apiError
		if err := json.Unmarshal(se.Body, &ae); err != nil || ae.Error == "" {
			return fmt.Errorf("%s: %s %s: %w", c.path, method, path, se)
		}
		return &RemoteError{Msg: ae.Error, Pair: ae.Pair, kind: ae.Kind}
	}
	return fmt.Errorf("%s: %w", c.path, err)
}

// Status returns the state of every pair.
func (c *Client) Status(ctx context.Context) ([]PairStatus, error) {
	var out []PairStatus
	err := c.do(ctx, http.MethodGet, "/v1/pairs", &out)
	return out, err
}

// Up brings a pair up, or only its leg leg (Supervisor.Up), waiting up to
// wait for its legs.
func (c *Client) Up(ctx context.Context, name, leg string, wait time.Duration) (PairStatus, error) {
	var out PairStatus
	q := url.Values{"wait": {wait.String()}}
	err := c.legDo(ctx, pairPath(name, leg, "up")+"?"+q.Encode(), leg, &out)
	return out, err
}

// Down takes a pair down, or only its leg leg (Supervisor.Down).
func (c *Client) Down(ctx context.Context, name, leg string, force bool) (PairStatus, error) {
	var out PairStatus
	path := pairPath(name, leg, "down")
	if force {
		path += "?force=1"
	}
	err := c.legDo(ctx, path, leg, &out)
	return out, err
}

// pairPath is the route of verb (up, down) for a pair, or one of its legs.
func pairPath(name, leg, verb string) string {
	p := "/v1/pairs/" + url.PathEscape(name)
	if leg != "" {
		p += "/legs/" + url.PathEscape(leg)
	}
	return p + "/" + verb
}

// legDo posts to path; a daemon from before the legs' routes answers a
// leg's with a bare 404, which is told as such.
func (c *Client) legDo(ctx context.Context, path, leg string, out any) error {
	err := c.do(ctx, http.MethodPost, path, out)
	var se *localapi.StatusError
	if leg != "" && errors.As(err, &se) && se.Code == http.StatusNotFound {
		return fmt.Errorf("the running lvnbd client does not take one leg at a time (it is older than this command): "+
			"restart it to run this version (systemctl restart lvnbd-client: the devices stay attached, and pairs taken down come up again), or act on the whole pair: %w", err)
	}
	return err
}
