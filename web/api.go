package web

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Backend is what the API needs from a coordinator.
type Backend interface {
	SubmitBuild(ctx context.Context, m *pb.SubmitBuild) (*pb.Build, error)
	// Apply commits commands through Raft from any node (the leader
	// stamps times and build IDs) and returns once they are applied here.
	Apply(ctx context.Context, cmds ...*pb.Command) (*raftfsm.EntryResult, error)
	Read() *raftfsm.Reader
	AppliedIndex() uint64
	// WaitApplied returns once this node has applied index, or ctx ends.
	WaitApplied(ctx context.Context, index uint64) error
	// CatchUp waits until this node has applied what it knows to be
	// committed, or ctx ends.
	CatchUp(ctx context.Context) error
	// ServeLog writes a stored log's text (ErrUnavailable when its blob
	// has not reached this node yet).
	ServeLog(w http.ResponseWriter, r *http.Request, rec *pb.LogRecord)
	// LiveAgents maps each agent heard from recently to when it was last
	// heard from; known is false when the leader could not be asked.
	LiveAgents(ctx context.Context) (last map[string]time.Time, known bool)
	// Cluster describes the coordinators (each asked) and the cache.
	Cluster(ctx context.Context) ClusterStatus
	// Leader is the ID of the leader this node knows ("" when none).
	Leader() string
	// GossipAgents maps agent IDs to their state in the gossip pool
	// ("alive", "dead", "left"); nil when this node is not in one.
	GossipAgents() map[string]string
}

// Config configures the API handler.
type Config struct {
	Backend Backend
	// AdminAuth admits requests carrying the admin token (nil error) or
	// says why not: ErrUnauthenticated without credentials, ErrForbidden
	// with wrong ones.
	AdminAuth func(r *http.Request) error
	// SessionKey signs login session cookies; every coordinator must use
	// the same key so a session works on any node.
	SessionKey   []byte
	MaxBodyBytes int64
	// MaxWait bounds how long a read waits for a requested index (5 s).
	MaxWait time.Duration
	// Routes adds handlers served like the API's own (pattern → handler):
	// JSON 404/405, X-Kiln-Index, X-Kiln-Min-Index.
	Routes map[string]http.Handler
}

type api struct {
	cfg Config
	mux *http.ServeMux
}

// NewAPI returns the handler for the Hydra-compatible paths and /api/v1.
func NewAPI(cfg Config) http.Handler {
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 8 << 20
	}
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = 5 * time.Second
	}
	a := &api{cfg: cfg, mux: http.NewServeMux()}
	a.routesHydra()
	a.routesNative()
	for pattern, h := range cfg.Routes {
		a.mux.Handle(pattern, h)
	}
	return a
}

// ServeHTTP answers JSON errors for unknown routes (404) and wrong methods
// (405), waits for a requested index, and stamps X-Kiln-Index.
func (a *api) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w = &indexWriter{ResponseWriter: w, b: a.cfg.Backend}
	h, pattern := a.mux.Handler(r)
	if pattern == "" {
		// Distinguish an unknown path from a wrong method, in JSON.
		rec := &statusRecorder{}
		h.ServeHTTP(rec, r)
		if rec.status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", rec.Header().Get("Allow"))
			WriteJSON(w, http.StatusMethodNotAllowed, errorBody{fmt.Sprintf("method %s not allowed on %s", r.Method, r.URL.Path)})
			return
		}
		WriteJSON(w, http.StatusNotFound, errorBody{"no such endpoint: " + r.URL.Path})
		return
	}
	if err := a.waitFresh(r); err != nil {
		WriteError(w, err)
		return
	}
	a.mux.ServeHTTP(w, r)
}

type errorBody struct {
	Error string `json:"error"`
}

// MinIndexHeader asks for a read at least as fresh as a Raft index (the
// X-Kiln-Index of an earlier answer); ?min_index= does the same.
const MinIndexHeader = "X-Kiln-Min-Index"

func (a *api) waitFresh(r *http.Request) error {
	v := r.Header.Get(MinIndexHeader)
	if q := r.URL.Query().Get("min_index"); q != "" {
		v = q
	}
	if v == "" {
		return nil
	}
	idx, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return fmt.Errorf("%w: min index %q is not a number", raftfsm.ErrInvalid, trunc(v))
	}
	if a.cfg.Backend.AppliedIndex() >= idx {
		return nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), a.cfg.MaxWait)
	defer cancel()
	if err := a.cfg.Backend.WaitApplied(ctx, idx); err != nil {
		return fmt.Errorf("%w: this node has applied %d, not yet %d", raftfsm.ErrUnavailable, a.cfg.Backend.AppliedIndex(), idx)
	}
	return nil
}

// indexWriter sets X-Kiln-Index when the status is written, so an answer
// to a write carries an index that includes it.
type indexWriter struct {
	http.ResponseWriter
	b           Backend
	wroteHeader bool
}

func (w *indexWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.wroteHeader = true
		w.Header().Set("X-Kiln-Index", strconv.FormatUint(w.b.AppliedIndex(), 10))
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *indexWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

func (w *indexWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// statusRecorder captures what the mux's fallback handler would answer.
type statusRecorder struct {
	h      http.Header
	status int
}

func (s *statusRecorder) Header() http.Header {
	if s.h == nil {
		s.h = http.Header{}
	}
	return s.h
}
func (s *statusRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusRecorder) WriteHeader(code int)        { s.status = code }

// need wraps a handler that changes state: the caller must hold the admin
// token or a session of a user with role (or "admin").
func (a *api) need(role string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := a.authorize(r, role); err != nil {
			WriteError(w, err)
			return
		}
		h(w, r)
	}
}

// apply commits one command and returns its result.
func (a *api) apply(ctx context.Context, t pb.CommandType, m proto.Message) (raftfsm.CommandResult, error) {
	cmd, err := raftfsm.NewCommand(t, m, 0)
	if err != nil {
		return raftfsm.CommandResult{}, err
	}
	res, err := a.cfg.Backend.Apply(ctx, cmd)
	if err != nil {
		return raftfsm.CommandResult{}, err
	}
	r := res.Results[0]
	return r, r.Err
}

func pathUint(r *http.Request, name, what string) (uint64, error) {
	s := r.PathValue(name)
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("%w: %q is not a %s id", raftfsm.ErrInvalid, trunc(s), what)
	}
	return id, nil
}

func pathID(r *http.Request) (uint64, error) { return pathUint(r, "id", "build") }

func trunc(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
