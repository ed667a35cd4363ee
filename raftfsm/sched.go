package raftfsm

import (
	"slices"

	"github.com/hashicorp/go-memdb"
	"github.com/tidwall/btree"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Fits reports whether an agent may build a step: its systems include the
// step's, its supported features cover the step's required ones, and the
// step requires every feature the agent makes mandatory.
func Fits(a *pb.Agent, system string, required []string) bool {
	if !slices.Contains(a.Systems, system) {
		return false
	}
	for _, f := range required {
		if !slices.Contains(a.SupportedFeatures, f) {
			return false
		}
	}
	for _, m := range a.MandatoryFeatures {
		if !slices.Contains(required, m) {
			return false
		}
	}
	return true
}

// schedBefore is the scheduler's order between two runnable steps.
func schedBefore(a, b *stepRec) bool {
	if a.GlobalPriority != b.GlobalPriority {
		return a.GlobalPriority > b.GlobalPriority
	}
	if a.Priority != b.Priority {
		return a.Priority > b.Priority
	}
	if a.CreatedAt != b.CreatedAt {
		return a.CreatedAt < b.CreatedAt
	}
	return a.DrvPath < b.DrvPath
}

// FairShare is what the scheduler knows of each jobset's use of the farm:
// running leases and scheduling shares (Hydra's; default 100).
type FairShare struct {
	Running map[string]int
	Shares  map[string]int32
}

func (f *FairShare) load(jobset string) float64 {
	shares := f.Shares[jobset]
	if shares <= 0 {
		shares = 100
	}
	return float64(f.Running[jobset]) / float64(shares)
}

// FairShare counts running leases per jobset and reads their shares.
func (r *Reader) FairShare() (*FairShare, error) {
	f := &FairShare{Running: map[string]int{}, Shares: map[string]int32{}}
	leases, err := r.Leases()
	if err != nil {
		return nil, err
	}
	steps := readSteps(r.txn)
	for _, l := range leases {
		if s := steps.get(l.DrvPath); s != nil {
			f.Running[s.Jobset]++
		}
	}
	js, err := r.Jobsets("")
	if err != nil {
		return nil, err
	}
	for _, j := range js {
		f.Shares[j.Project+":"+j.Name] = j.SchedulingShares
	}
	return f, nil
}

// fairCandidates is how many of a group's best steps fair share chooses among.
const fairCandidates = 32

// PickRunnable returns up to n runnable steps the agent may build, best
// first, skipping steps that are backing off at now and those skip names.
// The order is global priority, priority, then (with fair non-nil) the
// jobset using the least of its share, then age; fair share chooses among
// the best few dozen steps of each group, which keeps the cost bounded.
// It walks the scheduler index one (system, feature set) group at a time,
// jumping over groups the agent cannot build, so its cost depends on the
// number of groups and skipped steps, not on the queue's length. Watch
// channels of what it read go to ws (when not nil), so a long-poll wakes
// when fitting work may have appeared.
func (r *Reader) PickRunnable(ws memdb.WatchSet, a *pb.Agent, now int64, n int, skip func(drv string) bool, fair *FairShare) ([]*pb.Step, error) {
	t := readSteps(r.txn)
	const runnable = pb.StepState_STEP_STATE_RUNNABLE
	var groups []*groupIter // one per fitting group
	defer func() {
		for _, g := range groups {
			g.it.Release()
		}
	}()
	for _, system := range a.Systems {
		if ws != nil {
			ws.Add(t.watchCh(watchKey{runnable, system}))
		}
		probe := groupStart(runnable, system, nil)
		for {
			g := &groupIter{}
			g.it.Init(t.sched, false)
			if !g.it.Seek(probe) {
				g.it.Release()
				break
			}
			s := g.it.Item()
			if s.State != runnable || s.System != system {
				g.it.Release()
				break
			}
			if Fits(a, system, s.RequiredFeatures) {
				g.first = s
				groups = append(groups, g)
			} else {
				g.it.Release()
			}
			probe = groupEnd(runnable, system, s.RequiredFeatures) // the next group
		}
	}
	// next returns a group's next step the agent may take now, or nil at
	// the group's end.
	next := func(i int) *stepRec {
		for s := groups[i].next(); s != nil; s = groups[i].next() {
			if s.NotBefore > now || (skip != nil && skip(s.DrvPath)) {
				continue
			}
			return s
		}
		return nil
	}
	if fair != nil {
		return protoSteps(pickFair(len(groups), next, n, fair)), nil
	}
	heads := make([]*stepRec, len(groups))
	for i := range groups {
		heads[i] = next(i)
	}
	var out []*stepRec
	for len(out) < n {
		best := -1
		for i, h := range heads {
			if h != nil && (best < 0 || schedBefore(h, heads[best])) {
				best = i
			}
		}
		if best < 0 {
			break
		}
		out = append(out, heads[best])
		heads[best] = next(best)
	}
	return protoSteps(out), nil
}

// protoSteps makes the protobuf records of picked steps.
func protoSteps(rs []*stepRec) []*pb.Step {
	out := make([]*pb.Step, len(rs))
	for i, r := range rs {
		out[i] = r.step(false)
	}
	return out
}

// groupIter walks one (runnable, system, features) group of the
// scheduler's tree from its first step, first.
type groupIter struct {
	it    btree.IterG[*stepRec]
	first *stepRec
	at    *stepRec // the last step returned
	done  bool
}

func (g *groupIter) next() *stepRec {
	switch {
	case g.done:
		return nil
	case g.at == nil:
		g.at = g.first
		return g.at
	case !g.it.Next():
		g.done = true
		return nil
	}
	s := g.it.Item()
	if s.State != g.first.State || s.System != g.first.System || !slices.Equal(s.RequiredFeatures, g.first.RequiredFeatures) {
		g.done = true
		return nil
	}
	g.at = s
	return s
}

// pickFair takes the best few steps of each group and orders them by
// priority, then the load of their jobset (updated as steps are picked),
// then age.
func pickFair(groups int, next func(int) *stepRec, n int, fair *FairShare) []*stepRec {
	var cands []*stepRec
	for i := range groups {
		for k := 0; k < max(n, fairCandidates); k++ {
			s := next(i)
			if s == nil {
				break
			}
			cands = append(cands, s)
		}
	}
	running := map[string]int{}
	for k, v := range fair.Running {
		running[k] = v
	}
	f := &FairShare{Running: running, Shares: fair.Shares}
	var out []*stepRec
	for len(out) < n && len(cands) > 0 {
		best := 0
		for i, c := range cands[1:] {
			b := cands[best]
			switch {
			case c.GlobalPriority != b.GlobalPriority:
				if c.GlobalPriority > b.GlobalPriority {
					best = i + 1
				}
			case c.Priority != b.Priority:
				if c.Priority > b.Priority {
					best = i + 1
				}
			case f.load(c.Jobset) != f.load(b.Jobset):
				if f.load(c.Jobset) < f.load(b.Jobset) {
					best = i + 1
				}
			case schedBefore(c, b):
				best = i + 1
			}
		}
		s := cands[best]
		out = append(out, s)
		f.Running[s.Jobset]++
		cands = append(cands[:best], cands[best+1:]...)
	}
	return out
}
