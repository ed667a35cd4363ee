package raftfsm

import (
	"cmp"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"

	"github.com/hashicorp/go-memdb"
	"github.com/tidwall/btree"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Steps are not stored as go-memdb rows. A million queued steps made
// memdb's radix trees most of the heap (≈ 450 bytes per index entry, two
// entries per step) and most of the cost of every write. They live in
// copy-on-write B-trees (tidwall/btree: items packed in nodes of up to 31,
// a few bytes of overhead each), one version of which is the single row of
// memdb table tableStepTable. memdb's transactions therefore still make a
// step write atomic with everything else a command writes, aborted
// transactions leave no trace, and a reader sees the steps of its own
// transaction's version.
//
// A version is changed in place only by the write transaction that copied
// it (its owner); published versions are never written again, so readers
// and snapshots may walk them concurrently with later writes.
type stepTable struct {
	tableRow
	byDrv   *btree.BTreeG[*stepRec]    // every step, by derivation path
	sched   *btree.BTreeG[*stepRec]    // every step, in schedCmp order
	byLease *btree.BTreeG[leaseItem]   // steps with a lease ID, by it
	watch   map[watchKey]chan struct{} // closed when a step joins, leaves or changes in the group
	added   chan struct{}              // closed when watch gains a group
	fresh   map[watchKey]bool          // groups whose channel the owner replaced
	grown   bool                       // the owner replaced added
}

type leaseItem struct {
	id uint64
	s  *stepRec
}

// watchKey names a group of steps long-polls may wait on: one state, and
// one system or ("") every system.
type watchKey struct {
	state  pb.StepState
	system string
}

const treeDegree = 16 // nodes of 15–31 items: a random write copies half what the default 32 would

func newStepTable() *stepTable {
	opts := btree.Options{Degree: treeDegree, NoLocks: true}
	return &stepTable{
		byDrv:   btree.NewBTreeGOptions(func(a, b *stepRec) bool { return a.DrvPath < b.DrvPath }, opts),
		sched:   btree.NewBTreeGOptions(func(a, b *stepRec) bool { return schedCmp(a, b) < 0 }, opts),
		byLease: btree.NewBTreeGOptions(func(a, b leaseItem) bool { return a.id < b.id }, opts),
		watch:   map[watchKey]chan struct{}{},
		added:   make(chan struct{}),
	}
}

// schedCmp orders steps by state, system, required features, then the
// scheduler's order within a group: global priority and priority
// descending, age ascending, derivation path. Each (state, system,
// features) group is one contiguous run.
func schedCmp(a, b *stepRec) int {
	if c := cmp.Compare(a.State, b.State); c != 0 {
		return c
	}
	if c := strings.Compare(a.System, b.System); c != 0 {
		return c
	}
	if c := slices.Compare(a.RequiredFeatures, b.RequiredFeatures); c != 0 {
		return c
	}
	if c := cmp.Compare(b.GlobalPriority, a.GlobalPriority); c != 0 {
		return c
	}
	if c := cmp.Compare(b.Priority, a.Priority); c != 0 {
		return c
	}
	if c := cmp.Compare(a.CreatedAt, b.CreatedAt); c != 0 {
		return c
	}
	return strings.Compare(a.DrvPath, b.DrvPath)
}

// groupStart sorts before every step of a (state, system, features) group
// and after every step of the groups before it; with system "" (and no
// features), before every step of the state.
func groupStart(state pb.StepState, system string, features []string) *stepRec {
	return &stepRec{State: state, System: system, RequiredFeatures: features,
		GlobalPriority: math.MaxInt64, Priority: math.MaxInt32, CreatedAt: math.MinInt64}
}

// groupEnd sorts after every step of a group (real derivation paths start
// with "/") and before every step of the groups after it.
func groupEnd(state pb.StepState, system string, features []string) *stepRec {
	return &stepRec{State: state, System: system, RequiredFeatures: features,
		GlobalPriority: math.MinInt64, Priority: math.MinInt32, CreatedAt: math.MaxInt64, DrvPath: "\xff"}
}

// readSteps returns the version of the steps txn sees.
func readSteps(txn *memdb.Txn) *stepTable { return readRow[*stepTable](txn, tableStepTable) }

// writeSteps returns the version of the steps txn may change: on the
// transaction's first write, a copy of the current one (its B-trees share
// every node until one is written), stored as the table's row.
func writeSteps(txn *memdb.Txn) (*stepTable, error) {
	cur := readSteps(txn)
	if cur.owner == txn {
		return cur, nil
	}
	t := &stepTable{byDrv: cur.byDrv.Copy(), sched: cur.sched.Copy(), byLease: cur.byLease.Copy(),
		watch: cur.watch, added: cur.added}
	return t, t.own(txn)
}

func (t *stepTable) own(txn *memdb.Txn) error {
	return t.tableRow.own(txn, tableStepTable, t, func() { t.fresh, t.grown = nil, false })
}

// get returns a stored step, or nil.
func (t *stepTable) get(drv string) *stepRec {
	probe := drvProbes.Get().(*stepRec)
	probe.DrvPath = drv
	s, _ := t.byDrv.Get(probe)
	probe.DrvPath = ""
	drvProbes.Put(probe)
	return s
}

// drvProbes are keys for byDrv lookups (its items are the steps
// themselves, 8 bytes each, rather than path and step).
var drvProbes = sync.Pool{New: func() any { return new(stepRec) }}

// leased returns the step whose lease ID (current or last) is id, or nil.
func (t *stepTable) leased(id uint64) *stepRec {
	it, ok := t.byLease.Get(leaseItem{id: id})
	if !ok {
		return nil
	}
	return it.s
}

// put stores p, replacing the step of its derivation, and schedules the
// watch channels of the groups it leaves and joins to close when txn
// commits. The stored record is a copy sharing p's strings and slices: p
// must not be changed afterwards.
func (t *stepTable) put(txn *memdb.Txn, p *pb.Step, strs *interner) {
	s := recOf(p, strs)
	old, had := t.byDrv.Set(s)
	if had {
		if schedCmp(old, s) != 0 {
			t.sched.Delete(old)
		}
		if old.LeaseId != 0 && old.LeaseId != s.LeaseId {
			t.byLease.Delete(leaseItem{id: old.LeaseId})
		}
		t.touch(txn, old.State, old.System)
	}
	t.sched.Set(s) // replaces old when their keys are equal
	if s.LeaseId != 0 {
		t.byLease.Set(leaseItem{s.LeaseId, s})
	}
	t.touch(txn, s.State, s.System)
}

func (t *stepTable) touch(txn *memdb.Txn, state pb.StepState, system string) {
	t.replace(txn, watchKey{state, ""})
	t.replace(txn, watchKey{state, system})
}

// replace gives a group a new watch channel in this version and closes
// the old one once txn commits (an aborted transaction closes nothing).
func (t *stepTable) replace(txn *memdb.Txn, k watchKey) {
	if t.fresh[k] {
		return
	}
	if t.fresh == nil {
		t.fresh = map[watchKey]bool{}
		t.watch = maps.Clone(t.watch) // the published version's map is shared
	}
	t.fresh[k] = true
	old, ok := t.watch[k]
	if !ok && !t.grown {
		old, t.added, t.grown = t.added, make(chan struct{}), true
		ok = true
	}
	t.watch[k] = make(chan struct{})
	if ok {
		txn.Defer(func() { close(old) })
	}
}

// watchCh is closed when a step of the group changes.
func (t *stepTable) watchCh(k watchKey) <-chan struct{} {
	if ch, ok := t.watch[k]; ok {
		return ch
	}
	return t.added
}

// each calls fn for every step in derivation order until it returns false.
func (t *stepTable) each(fn func(*stepRec) bool) {
	t.byDrv.Scan(fn)
}

// interner shares the strings many steps repeat (systems, jobsets,
// features), so a million steps hold one copy of each, not a million.
// It only saves memory: the state is the same with or without it.
type interner struct {
	strs  map[string]string
	feats map[string][]string
}

// maxInterned bounds what an interner keeps; past it, values are kept as given.
const maxInterned = 1 << 14

func (n *interner) str(s string) string {
	if v, ok := n.strs[s]; ok {
		return v
	}
	if n.strs == nil {
		n.strs = map[string]string{}
	}
	if len(n.strs) < maxInterned {
		n.strs[s] = s
	}
	return s
}

// features returns a shared copy of a sorted feature list (nil when empty).
// Records are never modified in place, so sharing the slice is safe.
func (n *interner) features(fs []string) []string {
	if len(fs) == 0 {
		return nil
	}
	k := FeaturesKey(fs)
	if v, ok := n.feats[k]; ok {
		return v
	}
	if n.feats == nil {
		n.feats = map[string][]string{}
	}
	fs = slices.Clone(fs)
	for i, f := range fs {
		fs[i] = n.str(f)
	}
	if len(n.feats) < maxInterned {
		n.feats[k] = fs
	}
	return fs
}

// stepRec is how a step is stored: pb.Step's fields without the
// protobuf message machinery, outputs inline. At a million queued steps
// the message (288 bytes, and 80 more per output message) was most of the
// heap; this is 240 bytes and 32 per output. recOf and step convert;
// TestStepRecRoundTrip fails when pb.Step gains a field this lacks.
type stepRec struct {
	DrvPath, System, Jobset, LastError                          string
	Outputs                                                     []outputRec
	InputDrvs, RequiredFeatures, Dependents                     []string
	CreatedAt, StartedAt, FinishedAt, NotBefore, GlobalPriority int64
	LeaseId                                                     uint64
	Tries, Attempts, PendingInputs, Refs                        uint32
	Priority, BuildStatus                                       int32
	State                                                       pb.StepState
}

type outputRec struct{ Name, Path string }

// recOf makes the stored form of a step, sharing its strings and slices
// (with the repeated strings interned when strs is not nil).
func recOf(s *pb.Step, strs *interner) *stepRec {
	r := &stepRec{
		DrvPath: s.DrvPath, System: s.System, Jobset: s.Jobset, LastError: s.LastError,
		InputDrvs: s.InputDrvs, RequiredFeatures: s.RequiredFeatures, Dependents: s.Dependents,
		CreatedAt: s.CreatedAt, StartedAt: s.StartedAt, FinishedAt: s.FinishedAt, NotBefore: s.NotBefore,
		GlobalPriority: s.GlobalPriority, LeaseId: s.LeaseId, Tries: s.Tries, Attempts: s.Attempts,
		PendingInputs: s.PendingInputs, Refs: s.Refs, Priority: s.Priority, BuildStatus: s.BuildStatus, State: s.State,
	}
	if len(s.Outputs) > 0 {
		r.Outputs = make([]outputRec, len(s.Outputs))
		for i, o := range s.Outputs {
			r.Outputs[i] = outputRec{o.Name, o.Path}
		}
	}
	if strs != nil {
		r.System = strs.str(r.System)
		r.Jobset = strs.str(r.Jobset)
		r.RequiredFeatures = strs.features(r.RequiredFeatures)
		for i := range r.Outputs {
			r.Outputs[i].Name = strs.str(r.Outputs[i].Name)
		}
	}
	return r
}

// step makes the protobuf record of a stored step. Its slices are the
// stored ones unless clone is set: only a clone may be changed.
func (r *stepRec) step(clone bool) *pb.Step {
	s := &pb.Step{
		DrvPath: r.DrvPath, System: r.System, Jobset: r.Jobset, LastError: r.LastError,
		InputDrvs: r.InputDrvs, RequiredFeatures: r.RequiredFeatures, Dependents: r.Dependents,
		CreatedAt: r.CreatedAt, StartedAt: r.StartedAt, FinishedAt: r.FinishedAt, NotBefore: r.NotBefore,
		GlobalPriority: r.GlobalPriority, LeaseId: r.LeaseId, Tries: r.Tries, Attempts: r.Attempts,
		PendingInputs: r.PendingInputs, Refs: r.Refs, Priority: r.Priority, BuildStatus: r.BuildStatus, State: r.State,
	}
	if clone {
		s.InputDrvs = slices.Clone(r.InputDrvs)
		s.RequiredFeatures = slices.Clone(r.RequiredFeatures)
		s.Dependents = slices.Clone(r.Dependents)
	}
	if len(r.Outputs) > 0 {
		outs := make([]pb.Output, len(r.Outputs))
		s.Outputs = make([]*pb.Output, len(r.Outputs))
		for i, o := range r.Outputs {
			outs[i].Name, outs[i].Path = o.Name, o.Path
			s.Outputs[i] = &outs[i]
		}
	}
	return s
}
