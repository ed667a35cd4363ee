package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// proposer turns concurrent writes into few Raft entries (group commit):
// one entry is in flight at a time, and whatever queued up while it was
// being committed goes into the next, so many small commands share one
// entry, one disk sync on each node and one FSM transaction.
//
// When the entry just committed was shared, the writers it answered are
// likely to write again at once (a submitter's next build, an agent's next
// poll); the next entry then waits up to gather until as many proposals
// made since that answer have joined it as the entry answered. Otherwise
// 64 writers settle into two alternating halves, each writer missing
// every other entry (BenchmarkSubmitVsRawRaft: 32.5 submissions per entry
// without the wait, about 51 with 300 µs). A lone writer's entries are
// never shared, so it never waits.
type proposer struct {
	r        *raft.Raft
	timeout  time.Duration
	gather   time.Duration
	in       chan *proposal
	inflight chan struct{}
	pending  chan *pendingEntry
	// answers counts the entries answered; a proposal notes it when made.
	answers atomic.Uint64
	// observe, when set, gets each committed entry's commit time (seconds).
	observe func(float64)
}

type proposal struct {
	seq  uint64 // proposer.answers when it was made
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
	// maxInflight entries are committing at once. More in flight makes
	// entries smaller, not faster: raft batches whatever is queued into
	// one disk write anyway, and each entry costs its own encoding,
	// storing and applying on every node (BenchmarkSubmitVsRawRaft,
	// 64 writers: 9.6 submissions per entry with 4, 32.5 and about 10%
	// more submissions/s with 1; 8 and 32 were slower still).
	maxInflight = 1
)

func newProposer(r *raft.Raft, timeout, gather time.Duration) *proposer {
	return &proposer{
		r: r, timeout: timeout, gather: gather,
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
	pr := &proposal{seq: p.answers.Load(), cmds: cmds, done: make(chan proposalResult, 1)}
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
	answered := 0 // proposals in the entry before this one
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
		b := &entryBatch{p: p, props: []*proposal{first}, n: len(first.cmds), size: commandsSize(first.cmds)}
		for drained := false; !drained; {
			select {
			case pr := <-p.in:
				if !b.add(ctx, pr) {
					return
				}
			default:
				drained = true
			}
		}
		if p.gather > 0 && answered > 1 {
			// The proposals made before the last answer were waiting
			// for this entry; the answered writers come on top.
			last, want := p.answers.Load(), answered
			for _, pr := range b.props {
				if pr.seq < last {
					want++
				}
			}
			t := time.NewTimer(p.gather)
		gather:
			for len(b.props) < want && !b.cut {
				select {
				case pr := <-p.in:
					if !b.add(ctx, pr) {
						t.Stop()
						return
					}
				case <-t.C:
					break gather
				case <-ctx.Done():
					break gather
				}
			}
			t.Stop()
		}
		answered = len(b.props)
		p.submit(b.props)
	}
}

// entryBatch is the entry being filled.
type entryBatch struct {
	p       *proposer
	props   []*proposal
	n, size int
	cut     bool // an entry was submitted full: no need to gather more
}

// add puts pr in the entry, first submitting the entry (and waiting for a
// slot for the next) when pr would make it too large. It is false when ctx
// ended while waiting; pr has then been answered.
func (b *entryBatch) add(ctx context.Context, pr *proposal) bool {
	if b.n+len(pr.cmds) > raftfsm.MaxCommandsPerEntry || b.size+commandsSize(pr.cmds) > maxEntryBytes {
		b.p.submit(b.props)
		b.props, b.n, b.size, b.cut = nil, 0, 0, true
		select {
		case b.p.inflight <- struct{}{}:
		case <-ctx.Done():
			pr.done <- proposalResult{err: fmt.Errorf("%w: shutting down", raftfsm.ErrUnavailable)}
			return false
		}
	}
	b.props = append(b.props, pr)
	b.n += len(pr.cmds)
	b.size += commandsSize(pr.cmds)
	return true
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
		// Before the slot is freed and the answers sent: the next entry
		// counts a writer answered below and writing again as having
		// come since.
		p.answers.Add(1)
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
