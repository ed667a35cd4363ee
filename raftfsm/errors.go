package raftfsm

import (
	"errors"
	"net/http"

	"connectrpc.com/connect"
)

// Sentinel errors. Callers wrap them with %w and test them with errors.Is;
// StatusOf is the one place that maps them to HTTP statuses and Connect codes.
var (
	ErrInvalid         = errors.New("invalid argument")
	ErrNotFound        = errors.New("not found")
	ErrConflict        = errors.New("conflict")
	ErrStaleLease      = errors.New("stale lease")
	ErrTooLarge        = errors.New("too large")
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrForbidden       = errors.New("forbidden")
	ErrNoLeader        = errors.New("no leader")
	ErrUnavailable     = errors.New("unavailable")
	ErrUnknownCommand  = errors.New("unknown command type")
)

// StatusOf maps an error to its HTTP status and Connect code.
func StatusOf(err error) (int, connect.Code) {
	switch {
	case err == nil:
		return http.StatusOK, 0
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrUnknownCommand):
		return http.StatusBadRequest, connect.CodeInvalidArgument
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, connect.CodeNotFound
	case errors.Is(err, ErrConflict):
		return http.StatusConflict, connect.CodeAlreadyExists
	case errors.Is(err, ErrStaleLease):
		return http.StatusConflict, connect.CodeFailedPrecondition
	case errors.Is(err, ErrTooLarge):
		return http.StatusRequestEntityTooLarge, connect.CodeResourceExhausted
	case errors.Is(err, ErrUnauthenticated):
		return http.StatusUnauthorized, connect.CodeUnauthenticated
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, connect.CodePermissionDenied
	case errors.Is(err, ErrNoLeader), errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, connect.CodeUnavailable
	}
	return http.StatusInternalServerError, connect.CodeInternal
}

// Kind names the sentinel an error wraps, so results can cross process
// boundaries (leader forwarding) and be rebuilt with FromKind.
func Kind(err error) string {
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			return s.kind
		}
	}
	if err == nil {
		return ""
	}
	return "internal"
}

// FromKind rebuilds an error of the given kind with msg as its text.
func FromKind(kind, msg string) error {
	if kind == "" {
		return nil
	}
	for _, s := range sentinels {
		if s.kind == kind {
			return &kindError{msg: msg, err: s.err}
		}
	}
	return errors.New(msg)
}

type kindError struct {
	msg string
	err error
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.err }

var sentinels = []struct {
	kind string
	err  error
}{
	{"invalid", ErrInvalid},
	{"not_found", ErrNotFound},
	{"conflict", ErrConflict},
	{"stale_lease", ErrStaleLease},
	{"too_large", ErrTooLarge},
	{"unauthenticated", ErrUnauthenticated},
	{"forbidden", ErrForbidden},
	{"no_leader", ErrNoLeader},
	{"unavailable", ErrUnavailable},
	{"unknown_command", ErrUnknownCommand},
}
