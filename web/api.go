package web

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Backend is what the API needs from a coordinator.
type Backend interface {
	SubmitBuild(ctx context.Context, m *pb.SubmitBuild) (*pb.Build, error)
	CancelBuild(ctx context.Context, id uint64, reason string) (*pb.Build, error)
	Read() *raftfsm.Reader
	AppliedIndex() uint64
}

// Config configures the API handler.
type Config struct {
	Backend Backend
	// Authorize admits write requests (nil error) or says why not.
	Authorize    func(r *http.Request) error
	MaxBodyBytes int64
	Logger       *slog.Logger
}

type api struct {
	cfg Config
	mux *http.ServeMux
}

// NewAPI returns the handler for /api/v1/….
func NewAPI(cfg Config) http.Handler {
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 8 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &api{cfg: cfg, mux: http.NewServeMux()}
	a.mux.HandleFunc("POST /api/v1/builds", a.write(a.submitBuild))
	a.mux.HandleFunc("GET /api/v1/builds", a.listBuilds)
	a.mux.HandleFunc("GET /api/v1/builds/{id}", a.getBuild)
	a.mux.HandleFunc("GET /api/v1/builds/{id}/steps", a.buildSteps)
	a.mux.HandleFunc("POST /api/v1/builds/{id}/cancel", a.write(a.cancelBuild))
	return a
}

func (a *api) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Kiln-Index", strconv.FormatUint(a.cfg.Backend.AppliedIndex(), 10))
	h, pattern := a.mux.Handler(r)
	if pattern == "" {
		// Distinguish an unknown path from a wrong method, in JSON.
		rec := &statusRecorder{}
		h.ServeHTTP(rec, r)
		if rec.status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", rec.Header().Get("Allow"))
			WriteJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": fmt.Sprintf("method %s not allowed on %s", r.Method, r.URL.Path)})
			return
		}
		WriteJSON(w, http.StatusNotFound, map[string]string{"error": "no such endpoint: " + r.URL.Path})
		return
	}
	a.mux.ServeHTTP(w, r)
}

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

// write wraps a handler that changes state: it must be authorised first.
func (a *api) write(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if a.cfg.Authorize != nil {
			if err := a.cfg.Authorize(r); err != nil {
				WriteError(w, err)
				return
			}
		}
		h(w, r)
	}
}

func pathID(r *http.Request) (uint64, error) {
	s := r.PathValue("id")
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("%w: %q is not a build id", raftfsm.ErrInvalid, s)
	}
	return id, nil
}
