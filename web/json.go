package web

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"

	"github.com/kilnci/kiln/raftfsm"
)

// WriteJSON writes v as a JSON response.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

func sortedMapKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

var errEmptyBody = errors.New("empty request body")

// WriteError writes {"error": "..."} with the status the error maps to.
func WriteError(w http.ResponseWriter, err error) {
	status, _ := raftfsm.StatusOf(err)
	msg := err.Error()
	if status == http.StatusInternalServerError {
		msg = "internal error"
	}
	WriteJSON(w, status, errorBody{msg})
}

// decodeJSON reads one JSON value of at most limit bytes into v. Unknown
// fields, trailing data, malformed JSON and oversize bodies are errors
// wrapping ErrInvalid or ErrTooLarge.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	return decodeBody(w, r, limit, v, true)
}

// decodeJSONLenient is decodeJSON that ignores unknown fields, for the
// bodies Hydra's clients send (they carry fields Kiln has no use for).
func decodeJSONLenient(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	return decodeBody(w, r, limit, v, false)
}

func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, strict bool) error {
	if r.ContentLength > limit {
		return fmt.Errorf("%w: request body of %d bytes, limit %d", raftfsm.ErrTooLarge, r.ContentLength, limit)
	}
	body := http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(body)
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("%w: request body over %d bytes", raftfsm.ErrTooLarge, limit)
		}
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: %w", raftfsm.ErrInvalid, errEmptyBody)
		}
		return fmt.Errorf("%w: malformed JSON: %v", raftfsm.ErrInvalid, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("%w: request body over %d bytes", raftfsm.ErrTooLarge, limit)
		}
		return fmt.Errorf("%w: trailing data after the JSON value", raftfsm.ErrInvalid)
	}
	return nil
}
