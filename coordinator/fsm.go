package coordinator

import (
	"context"
	"io"
	"sync"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/raftfsm"
)

// notifyingFSM wraps the state machine and wakes waiters whenever the
// applied index moves (for read-your-writes after a forwarded write, and /ready).
type notifyingFSM struct {
	*raftfsm.FSM
	mu      sync.Mutex
	changed chan struct{}
}

var _ raft.BatchingFSM = (*notifyingFSM)(nil)

func newNotifyingFSM(f *raftfsm.FSM) *notifyingFSM {
	return &notifyingFSM{FSM: f, changed: make(chan struct{})}
}

func (n *notifyingFSM) wake() {
	n.mu.Lock()
	close(n.changed)
	n.changed = make(chan struct{})
	n.mu.Unlock()
}

func (n *notifyingFSM) Apply(l *raft.Log) any {
	defer n.wake()
	return n.FSM.Apply(l)
}

func (n *notifyingFSM) ApplyBatch(logs []*raft.Log) []any {
	defer n.wake()
	return n.FSM.ApplyBatch(logs)
}

func (n *notifyingFSM) Restore(rc io.ReadCloser) error {
	defer n.wake()
	return n.FSM.Restore(rc)
}

// waitApplied blocks until the applied index reaches index or ctx ends.
func (n *notifyingFSM) waitApplied(ctx context.Context, index uint64) error {
	for {
		n.mu.Lock()
		ch := n.changed
		n.mu.Unlock()
		if n.AppliedIndex() >= index {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
