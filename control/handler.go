package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"

	"go.uber.org/zap"

	"github.com/lvnbd/lvnbd/internal/localapi"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// Handler serves the control API for a server and, when not nil, its
// volumes.
func Handler(srv *server.Server, vols *server.Volumes, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	h := &handler{srv: srv, reg: srv.Exports(), vols: vols, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", h.status)
	mux.HandleFunc("GET /v1/volumes", h.withVolumes(h.listVolumes))
	mux.HandleFunc("GET /v1/volumes/{name}", h.withVolumes(h.getVolume))
	mux.HandleFunc("POST /v1/volumes", h.withVolumes(h.createVolume))
	mux.HandleFunc("POST /v1/volumes/{name}/resize", h.withVolumes(h.resizeVolume))
	mux.HandleFunc("DELETE /v1/volumes/{name}", h.withVolumes(h.removeVolume))
	mux.HandleFunc("GET /v1/snapshots", h.withVolumes(h.listSnapshots))
	mux.HandleFunc("POST /v1/snapshots", h.withVolumes(h.createSnapshot))
	mux.HandleFunc("DELETE /v1/snapshots/{ref}", h.withVolumes(h.removeSnapshot))
	mux.HandleFunc("POST /v1/snapshots/{ref}/merge", h.withVolumes(h.mergeSnapshot))
	mux.HandleFunc("POST /v1/sync", h.withVolumes(h.sync))
	mux.HandleFunc("POST /v1/exports/{name}/recover", h.recover)
	mux.HandleFunc("GET /v1/fences", h.listFences)
	mux.HandleFunc("POST /v1/fences", h.fence)
	mux.HandleFunc("DELETE /v1/fences", h.unfence)
	return mux
}

type handler struct {
	srv  *server.Server
	reg  *server.Registry
	vols *server.Volumes
	log  *zap.Logger
}

func (h *handler) withVolumes(f http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if h.vols == nil {
			writeError(w, ErrNoVolumes)
			return
		}
		h.log.Info("control request", zap.String("method", r.Method), zap.String("path", r.URL.Path))
		f(w, r)
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch kindOf(err) {
	case "not_found", "no_export":
		code = http.StatusNotFound
	case "exists", "in_use", "has_snapshots", "merge_pending", "not_failed":
		code = http.StatusConflict
	case "invalid_name", "invalid_size", "shrink", "no_volumes", "unsupported":
		code = http.StatusBadRequest
	case "no_space":
		code = http.StatusInsufficientStorage
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(errorBody{Error: err.Error(), Kind: kindOf(err)})
}

// decode reads a JSON body strictly: unknown fields are a client bug.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad request body: %w", err)
	}
	return nil
}

func force(r *http.Request) bool { return r.URL.Query().Get("force") == "1" }

func (h *handler) status(w http.ResponseWriter, r *http.Request) {
	st := Status{Exports: h.reg.Status()}
	if f := h.reg.Failures(); f != nil {
		st.Failures = f.List()
	}
	if h.vols != nil {
		st.Driver, st.Epoch = h.vols.Driver().String(), h.vols.Epoch
		st.Shrinks = h.vols.PendingShrinks()
	}
	writeJSON(w, st)
}

func (h *handler) listVolumes(w http.ResponseWriter, r *http.Request) {
	vols, err := h.vols.Driver().List(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, vols)
}

func (h *handler) getVolume(w http.ResponseWriter, r *http.Request) {
	vol, err := h.vols.Driver().Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, vol)
}

func (h *handler) createVolume(w http.ResponseWriter, r *http.Request) {
	var opts volume.CreateOptions
	if err := decode(r, &opts); err != nil {
		writeError(w, err)
		return
	}
	vol, err := h.vols.Create(r.Context(), opts)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, vol)
}

// ResizeRequest is the body of POST /v1/volumes/{name}/resize.
type ResizeRequest struct {
	Size        int64 `json:"size"`
	AllowShrink bool  `json:"allow_shrink"`
}

func (h *handler) resizeVolume(w http.ResponseWriter, r *http.Request) {
	var req ResizeRequest
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	vol, err := h.vols.Resize(r.Context(), r.PathValue("name"), req.Size, req.AllowShrink, force(r))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, vol)
}

func (h *handler) removeVolume(w http.ResponseWriter, r *http.Request) {
	if err := h.vols.Remove(r.Context(), r.PathValue("name"), force(r)); err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, struct{}{})
}

func (h *handler) listSnapshots(w http.ResponseWriter, r *http.Request) {
	snaps, err := h.vols.Driver().Snapshots(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, snaps)
}

func (h *handler) createSnapshot(w http.ResponseWriter, r *http.Request) {
	var opts volume.SnapshotOptions
	if err := decode(r, &opts); err != nil {
		writeError(w, err)
		return
	}
	snap, err := h.vols.Snapshot(r.Context(), opts)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, snap)
}

func (h *handler) removeSnapshot(w http.ResponseWriter, r *http.Request) {
	vol, snap, err := volume.ParseSnapshotRef(r.PathValue("ref"))
	if err == nil {
		err = h.vols.RemoveSnapshot(r.Context(), vol, snap, force(r))
	}
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, struct{}{})
}

func (h *handler) mergeSnapshot(w http.ResponseWriter, r *http.Request) {
	vol, snap, err := volume.ParseSnapshotRef(r.PathValue("ref"))
	if err == nil {
		err = h.vols.MergeSnapshot(r.Context(), vol, snap, force(r))
	}
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, struct{}{})
}

func (h *handler) sync(w http.ResponseWriter, r *http.Request) {
	if err := h.vols.Sync(r.Context()); err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, struct{}{})
}

func (h *handler) recover(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	h.log.Warn("recovery of a failed export requested", zap.String("export", name))
	var res server.RecoverResult
	var err error
	if h.vols != nil {
		res, err = h.vols.Recover(r.Context(), name)
	} else {
		res, err = h.reg.Recover(name)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	h.log.Warn("failed export recovered: the failure record is cleared; a guest's mirror must copy this half in full",
		zap.String("export", name), zap.String("failure", res.Failure), zap.Bool("reopened", res.Reopened),
		zap.Int("clients_cut", res.ClientsCut))
	writeJSON(w, res)
}

func (h *handler) listFences(w http.ResponseWriter, r *http.Request) {
	if h.srv.Fences() == nil {
		writeError(w, errNoFences)
		return
	}
	writeJSON(w, h.srv.Fences().List())
}

var errNoFences = errors.New("this server has no fence list (--fence-file)")

// FenceResult is the answer to POST /v1/fences.
type FenceResult struct {
	ConnectionsCut int `json:"connections_cut"`
}

func (h *handler) fence(w http.ResponseWriter, r *http.Request) {
	var f server.Fence
	if err := decode(r, &f); err != nil {
		writeError(w, err)
		return
	}
	h.log.Warn("fence requested", zap.String("client", f.Client), zap.String("export", f.Export))
	cut, err := h.srv.FenceClient(r.Context(), f)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, FenceResult{ConnectionsCut: cut})
}

func (h *handler) unfence(w http.ResponseWriter, r *http.Request) {
	client, export := r.URL.Query().Get("client"), r.URL.Query().Get("export")
	ok, err := h.srv.UnfenceClient(client, export)
	if err == nil && !ok {
		err = fmt.Errorf("no fence for client %q on %s: %w", client, server.FenceScope(export), volume.ErrNotFound)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, struct{}{})
}

// Listen opens the control socket at path: its directory is created 0700
// and the socket made 0600, and connections from users other than root and
// the server's own are refused, since the socket can remove volumes.
func Listen(path string) (net.Listener, error) { return localapi.Listen(path, "control socket") }

// Serve answers control requests on ln until ctx is done.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	return localapi.Serve(ctx, ln, h, "control socket")
}
