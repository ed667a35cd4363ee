package coordinator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// proposer turns concurrent writes into few Raft entries: whatever queued
// up while the previous entries were being committed goes into the next one
// (group commit), so many small commands share one disk sync.
type proposer struct {
	r        *raft.Raft
	timeout  time.Duration
	in       chan *proposal
	inflight chan struct{}
	pending  chan *pendingEntry
	// observe, when set, gets each committed entry's commit time (seconds).
	observe func(float64)
}

type proposal struct {
	cmds []*pb.Command
	done chan proposalResult // buffered: the proposer never blocks on it
}

type proposalResult struct {
	res *raftfsm.EntryResult
	err error
}

type pendingEntry struct {
	f     raft.ApplyFuture
	props []*proposal
	start time.Time
}

const (
	maxEntryBytes = 4 << 20
	maxInflight   = 4
)

func newProposer(r *raft.Raft, timeout time.Duration) *proposer {
	return &proposer{
		r: r, timeout: timeout,
		in:       make(chan *proposal, 4096),
		inflight: make(chan struct{}, maxInflight),
		pending:  make(chan *pendingEntry, maxInflight),
	}
}

// propose commits cmds in one entry (possibly shared with other callers)
// and returns their results.
func (p *proposer) propose(ctx context.Context, cmds []*pb.Command) (*raftfsm.EntryResult, error) {
	if len(cmds) > raftfsm.MaxCommandsPerEntry {
		return nil, fmt.Errorf("%w: %d commands in one write", raftfsm.ErrTooLarge, len(cmds))
	}
	pr := &proposal{cmds: cmds, done: make(chan proposalResult, 1)}
	select {
	case p.in <- pr:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: the write was not proposed in time: %w", raftfsm.ErrUnavailable, ctx.Err())
	}
	select {
	case r := <-pr.done:
		return r.res, r.err
	case <-ctx.Done():
		// It may still commit: the caller cannot know, so it is told to retry.
		return nil, fmt.Errorf("%w: the write was not committed in time (it may still be): %w", raftfsm.ErrUnavailable, ctx.Err())
	}
}

// run batches proposals into entries until ctx ends.
func (p *proposer) run(ctx context.Context) {
	go p.waitLoop(ctx)
	for {
		var first *proposal
		select {
		case first = <-p.in:
		case <-ctx.Done():
			return
		}
		select {
		case p.inflight <- struct{}{}:
		case <-ctx.Done():
			first.done <- proposalResult{err: fmt.Errorf("%w: shutting down", raftfsm.ErrUnavailable)}
			return
		}
		props := []*proposal{first}
		n, size := len(first.cmds), commandsSize(first.cmds)
	drain:
		for {
			select {
			case pr := <-p.in:
				if n+len(pr.cmds) > raftfsm.MaxCommandsPerEntry || size+commandsSize(pr.cmds) > maxEntryBytes {
					p.submit(props)
					props, n, size = nil, 0, 0
					select {
					case p.inflight <- struct{}{}:
					case <-ctx.Done():
						pr.done <- proposalResult{err: fmt.Errorf("%w: shutting down", raftfsm.ErrUnavailable)}
						return
					}
				}
				props = append(props, pr)
				n += len(pr.cmds)
				size += commandsSize(pr.cmds)
			default:
				break drain
			}
		}
		p.submit(props)
	}
}

func commandsSize(cmds []*pb.Command) int {
	n := 0
	for _, c := range cmds {
		n += len(c.Payload) + 16
	}
	return n
}

// submit hands one entry to raft; the caller holds an inflight slot.
func (p *proposer) submit(props []*proposal) {
	var cmds []*pb.Command
	for _, pr := range props {
		cmds = append(cmds, pr.cmds...)
	}
	data, err := raftfsm.EncodeEntry(cmds)
	if err != nil {
		<-p.inflight
		for _, pr := range props {
			pr.done <- proposalResult{err: err}
		}
		return
	}
	p.pending <- &pendingEntry{f: p.r.Apply(data, p.timeout), props: props, start: time.Now()}
}

// waitLoop collects commit results in order and hands each caller its part.
func (p *proposer) waitLoop(ctx context.Context) {
	for {
		var pe *pendingEntry
		select {
		case pe = <-p.pending:
		case <-ctx.Done():
			return
		}
		// An entry still queued when raft shuts down is never answered:
		// stop waiting with ctx (the callers' waits end with theirs).
		err := futureError(ctx, pe.f)
		if ctx.Err() != nil {
			for _, pr := range pe.props {
				pr.done <- proposalResult{err: fmt.Errorf("%w: shutting down; the write may or may not have been applied", raftfsm.ErrUnavailable)}
			}
			return
		}
		<-p.inflight
		if err == nil && p.observe != nil {
			p.observe(time.Since(pe.start).Seconds())
		}
		if err != nil {
			err = raftError(err)
			for _, pr := range pe.props {
				pr.done <- proposalResult{err: err}
			}
			continue
		}
		res, ok := pe.f.Response().(*raftfsm.EntryResult)
		if !ok {
			for _, pr := range pe.props {
				pr.done <- proposalResult{err: fmt.Errorf("unexpected apply response %T", pe.f.Response())}
			}
			continue
		}
		off := 0
		for _, pr := range pe.props {
			part := &raftfsm.EntryResult{Index: res.Index, Results: res.Results[off : off+len(pr.cmds)]}
			off += len(pr.cmds)
			pr.done <- proposalResult{res: part}
		}
	}
}

// errNotLeaderRetry marks a write that was never appended: safe to resend.
var errNotLeaderRetry = errors.New("not the leader")

// raftError maps raft's errors to domain errors.
func raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		// Nothing was stored: safe to send again to the next leader.
		return fmt.Errorf("%w: %w", raftfsm.ErrNoLeader, errNotLeaderRetry)
	case errors.Is(err, raft.ErrLeadershipLost):
		return fmt.Errorf("%w: leadership lost while committing; the write may or may not have been applied", raftfsm.ErrUnavailable)
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%w: the cluster is overloaded, retry later", raftfsm.ErrUnavailable)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: shutting down", raftfsm.ErrUnavailable)
	}
	return fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
}
