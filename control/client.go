package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/lvnbd/lvnbd/internal/localapi"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// ErrNoServer means nothing listens on the control socket: no lvnbd serve
// runs on this box (or it was started with another --control path).
var ErrNoServer = errors.New("no lvnbd server is listening on the control socket")

// Client talks to a running server's control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the socket at path; it connects per request.
func NewClient(path string) *Client {
	return &Client{path: path, hc: localapi.Client(path)}
}

// Path is the socket's path.
func (c *Client) Path() string { return c.path }

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	err := localapi.Do(ctx, c.hc, method, path, body, out, 64<<20)
	var se *localapi.StatusError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, localapi.ErrNotListening):
		return fmt.Errorf("%w (%s)", ErrNoServer, c.path)
	case errors.As(err, &se):
		var eb errorBody
		if err := json.Unmarshal(se.Body, &eb); err != nil || eb.Error == "" {
			return fmt.Errorf("control socket %s: %s %s: HTTP %d", c.path, method, path, se.Code)
		}
		return &RemoteError{Msg: eb.Error, sentinel: kinds[eb.Kind]}
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

// Status returns the server's exports and clients.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// Recover serves a failed export again (server.Registry.Recover).
func (c *Client) Recover(ctx context.Context, export string) (server.RecoverResult, error) {
	var res server.RecoverResult
	err := c.do(ctx, http.MethodPost, "/v1/exports/"+url.PathEscape(export)+"/recover", nil, &res)
	return res, err
}

// Sync makes the server re-read its volumes now.
func (c *Client) Sync(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/sync", nil, nil)
}

// Fences lists the server's fences.
func (c *Client) Fences(ctx context.Context) ([]server.Fence, error) {
	var list []server.Fence
	err := c.do(ctx, http.MethodGet, "/v1/fences", nil, &list)
	return list, err
}

// Fence fences a client off one export, or all with export "", and returns
// how many connections it cut; when it returns, none of their writes will
// reach the storage any more.
func (c *Client) Fence(ctx context.Context, client, export string) (int, error) {
	var res FenceResult
	err := c.do(ctx, http.MethodPost, "/v1/fences", server.Fence{Client: client, Export: export}, &res)
	return res.ConnectionsCut, err
}

// Unfence lifts a fence.
func (c *Client) Unfence(ctx context.Context, client, export string) error {
	q := url.Values{"client": {client}}
	if export != "" {
		q.Set("export", export)
	}
	return c.do(ctx, http.MethodDelete, "/v1/fences?"+q.Encode(), nil, nil)
}

// Driver returns a volume.Driver whose changes the server makes. With force,
// removals, merges and shrinks disconnect the clients of the affected exports
// instead of failing with server.ErrInUse.
func (c *Client) Driver(url string, force bool) volume.Driver {
	return &remoteDriver{c: c, url: url, force: force}
}

// remoteDriver is a volume.Driver that asks the server.
type remoteDriver struct {
	c     *Client
	url   string
	force bool
}

func (d *remoteDriver) String() string { return d.url }

func (d *remoteDriver) query() string {
	if d.force {
		return "?force=1"
	}
	return ""
}

func (d *remoteDriver) List(ctx context.Context) ([]volume.Volume, error) {
	var vols []volume.Volume
	err := d.c.do(ctx, http.MethodGet, "/v1/volumes", nil, &vols)
	return vols, err
}

func (d *remoteDriver) Get(ctx context.Context, name string) (volume.Volume, error) {
	var vol volume.Volume
	err := d.c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(name), nil, &vol)
	return vol, err
}

func (d *remoteDriver) Create(ctx context.Context, opts volume.CreateOptions) (volume.Volume, error) {
	var vol volume.Volume
	err := d.c.do(ctx, http.MethodPost, "/v1/volumes", opts, &vol)
	return vol, err
}

func (d *remoteDriver) Resize(ctx context.Context, name string, size int64, allowShrink bool) (volume.Volume, error) {
	var vol volume.Volume
	err := d.c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/resize"+d.query(),
		ResizeRequest{Size: size, AllowShrink: allowShrink}, &vol)
	return vol, err
}

func (d *remoteDriver) Remove(ctx context.Context, name string) error {
	return d.c.do(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(name)+d.query(), nil, nil)
}

// Path is not known remotely without a round trip; the CLI does not need it.
func (d *remoteDriver) Path(exportName string) string { return "" }

func (d *remoteDriver) Snapshot(ctx context.Context, opts volume.SnapshotOptions) (volume.Snapshot, error) {
	var snap volume.Snapshot
	err := d.c.do(ctx, http.MethodPost, "/v1/snapshots", opts, &snap)
	return snap, err
}

func (d *remoteDriver) Snapshots(ctx context.Context) ([]volume.Snapshot, error) {
	var snaps []volume.Snapshot
	err := d.c.do(ctx, http.MethodGet, "/v1/snapshots", nil, &snaps)
	return snaps, err
}

func (d *remoteDriver) RemoveSnapshot(ctx context.Context, vol, snap string) error {
	return d.c.do(ctx, http.MethodDelete, "/v1/snapshots/"+url.PathEscape(volume.SnapshotRef(vol, snap))+d.query(), nil, nil)
}

func (d *remoteDriver) MergeSnapshot(ctx context.Context, vol, snap string) error {
	return d.c.do(ctx, http.MethodPost, "/v1/snapshots/"+url.PathEscape(volume.SnapshotRef(vol, snap))+"/merge"+d.query(), nil, nil)
}

// OpenDriver returns the driver the volume commands should use: the running
// server's, through its control socket, when it serves the same volumes
// (so changes reach its exports at once and snapshots are quiesced), else
// the driver for volumesURL directly. note receives one line when the
// volumes are changed directly (nil: none, for listings).
func OpenDriver(ctx context.Context, controlPath, volumesURL string, force bool, note io.Writer) (volume.Driver, error) {
	if note == nil {
		note = io.Discard
	}
	local, err := volume.Open(volumesURL)
	if err != nil {
		return nil, err
	}
	if controlPath == "" {
		return local, nil
	}
	c := NewClient(controlPath)
	st, err := c.Status(ctx)
	switch {
	case errors.Is(err, ErrNoServer):
		// Said, since a server on another socket would be bypassed:
		// its clients not checked, its writes not paused.
		fmt.Fprintf(note, "note: no lvnbd serve answers on %s: changing %s directly (if a server uses another --control, give it)\n",
			controlPath, local)
		return local, nil
	case err != nil:
		return nil, err
	case st.Driver != local.String():
		fmt.Fprintf(note, "note: the server on %s serves %q, not %q: changing the volumes directly\n",
			controlPath, st.Driver, local.String())
		return local, nil
	}
	return c.Driver(st.Driver, force), nil
}
