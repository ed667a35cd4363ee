package rpc

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"connectrpc.com/connect"

	"github.com/kilnci/kiln/raftfsm"
)

// Authorizer decides whether a call to procedure with these headers may go on.
type Authorizer func(ctx context.Context, procedure string, h http.Header) error

// BearerToken extracts the token of an "Authorization: Bearer T" header.
func BearerToken(h http.Header) (string, bool) {
	v := h.Get("Authorization")
	tok, ok := strings.CutPrefix(v, "Bearer ")
	if !ok || tok == "" {
		return "", false
	}
	return tok, true
}

// TokenEqual compares secrets in constant time.
func TokenEqual(a, b string) bool {
	return len(a) > 0 && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// RequireToken is an Authorizer admitting calls that carry want as bearer
// token. A missing token is ErrUnauthenticated, a wrong one ErrForbidden.
func RequireToken(want string) Authorizer {
	return func(_ context.Context, _ string, h http.Header) error {
		tok, ok := BearerToken(h)
		if !ok {
			return fmt.Errorf("%w: missing bearer token", raftfsm.ErrUnauthenticated)
		}
		if !TokenEqual(tok, want) {
			return fmt.Errorf("%w: token not accepted", raftfsm.ErrForbidden)
		}
		return nil
	}
}

// RequireTokenOrBasic is RequireToken that also takes the token as the
// password of HTTP Basic auth (any user name), which is how Nix sends the
// credentials of its netrc file.
func RequireTokenOrBasic(want string) func(*http.Request) error {
	bearer := RequireToken(want)
	return func(r *http.Request) error {
		if _, pass, ok := r.BasicAuth(); ok {
			if !TokenEqual(pass, want) {
				return fmt.Errorf("%w: credentials not accepted", raftfsm.ErrForbidden)
			}
			return nil
		}
		return bearer(r.Context(), r.URL.Path, r.Header)
	}
}

// NewAuthInterceptor runs check for the procedures that need it
// (needsAuth(procedure) true) before their handlers.
func NewAuthInterceptor(check Authorizer, needsAuth func(procedure string) bool) connect.Interceptor {
	return connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if !req.Spec().IsClient && needsAuth(req.Spec().Procedure) {
				if err := check(ctx, req.Spec().Procedure, req.Header()); err != nil {
					return nil, Error(err)
				}
			}
			return next(ctx, req)
		}
	})
}

// Error converts a domain error to a Connect error with the mapped code.
func Error(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	_, code := raftfsm.StatusOf(err)
	return connect.NewError(code, err)
}

// WithBearer returns a client interceptor that sends token on every call.
func WithBearer(token string) connect.Interceptor {
	return connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if req.Spec().IsClient && token != "" {
				req.Header().Set("Authorization", "Bearer "+token)
			}
			return next(ctx, req)
		}
	})
}

// DomainError turns a Connect error from a peer back into a domain error so
// errors.Is works across the hop.
func DomainError(err error) error {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	var sentinel error
	switch ce.Code() {
	case connect.CodeInvalidArgument:
		sentinel = raftfsm.ErrInvalid
	case connect.CodeNotFound:
		sentinel = raftfsm.ErrNotFound
	case connect.CodeAlreadyExists:
		sentinel = raftfsm.ErrConflict
	case connect.CodeFailedPrecondition:
		sentinel = raftfsm.ErrStaleLease
	case connect.CodeResourceExhausted:
		sentinel = raftfsm.ErrTooLarge
	case connect.CodeUnauthenticated:
		sentinel = raftfsm.ErrUnauthenticated
	case connect.CodePermissionDenied:
		sentinel = raftfsm.ErrForbidden
	case connect.CodeUnavailable:
		sentinel = raftfsm.ErrUnavailable
	default:
		return err
	}
	return fmt.Errorf("%w: %s", sentinel, ce.Message())
}
