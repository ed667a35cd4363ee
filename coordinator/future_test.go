package coordinator

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// heldFuture is a Raft future answered only when the test says so; left
// unanswered it is what hashicorp/raft leaves behind for an Apply or a
// Barrier still queued when it shuts down.
type heldFuture struct{ answer chan error }

func (f heldFuture) Error() error { return <-f.answer }

func TestFutureErrorEndsWithContext(t *testing.T) {
	for _, tc := range []struct {
		name     string
		answered bool
		answer   error
		want     error
	}{
		{"answered", true, nil, nil},
		{"answered with an error", true, raft.ErrLeadershipLost, raft.ErrLeadershipLost},
		{"never answered", false, nil, context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := heldFuture{answer: make(chan error, 1)}
			if tc.answered {
				f.answer <- tc.answer
			}
			defer func() { // lets a goroutine still waiting end
				select {
				case f.answer <- nil:
				default:
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			err := futureError(ctx, f)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("futureError = %v, want %v", err, tc.want)
			}
		})
	}
}
