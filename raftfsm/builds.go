package raftfsm

import (
	"cmp"
	"maps"
	"math"
	"strings"
	"sync"

	"github.com/hashicorp/go-memdb"
	"github.com/tidwall/btree"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// buildTable holds the builds the way stepTable holds the steps (see
// there): four copy-on-write B-trees of the same records, one version of
// which is the single row of memdb table tableBuildTable. Every submission
// writes a build, and under go-memdb its four radix indexes (a leaf, a
// watch channel and path copies for each) were the largest part of
// applying one.
type buildTable struct {
	tableRow
	byID    *btree.BTreeG[*pb.Build] // by id
	byState *btree.BTreeG[*pb.Build] // by (state, id)
	byJob   *btree.BTreeG[*pb.Build] // by (project, jobset, job, id)
	byDrv   *btree.BTreeG[*pb.Build] // by (top-level derivation, id)
	// versions identify the contents of a range of builds (all of them,
	// one state, one project): a write replaces the token of every range
	// it changes, so a count remembered under a token is exact.
	versions map[string]*rangeVersion
	fresh    map[string]bool // ranges whose token the owner replaced
}

// rangeVersion is compared by identity only (not zero-sized: distinct
// tokens must have distinct addresses).
type rangeVersion struct{ _ byte }

func newBuildTable() *buildTable {
	opts := btree.Options{Degree: treeDegree, NoLocks: true}
	return &buildTable{
		byID:     btree.NewBTreeGOptions(func(a, b *pb.Build) bool { return a.Id < b.Id }, opts),
		byState:  btree.NewBTreeGOptions(func(a, b *pb.Build) bool { return a.State < b.State || a.State == b.State && a.Id < b.Id }, opts),
		byJob:    btree.NewBTreeGOptions(func(a, b *pb.Build) bool { return jobCmp(a, b) < 0 }, opts),
		byDrv:    btree.NewBTreeGOptions(func(a, b *pb.Build) bool { return a.DrvPath < b.DrvPath || a.DrvPath == b.DrvPath && a.Id < b.Id }, opts),
		versions: map[string]*rangeVersion{},
	}
}

func jobCmp(a, b *pb.Build) int {
	if c := strings.Compare(a.Project, b.Project); c != 0 {
		return c
	}
	if c := strings.Compare(a.Jobset, b.Jobset); c != 0 {
		return c
	}
	if c := strings.Compare(a.Job, b.Job); c != 0 {
		return c
	}
	return cmp.Compare(a.Id, b.Id)
}

// Range keys of versions.
const rangeAll = ""

func rangeState(s pb.BuildState) string { return "s" + string(rune('0'+s)) }
func rangeProject(p string) string      { return "p" + p }

func readBuilds(txn *memdb.Txn) *buildTable { return readRow[*buildTable](txn, tableBuildTable) }

// writeBuilds returns the version of the builds txn may change, copying
// the current one on the transaction's first build write.
func writeBuilds(txn *memdb.Txn) (*buildTable, error) {
	cur := readBuilds(txn)
	if cur.owner == txn {
		return cur, nil
	}
	t := &buildTable{byID: cur.byID.Copy(), byState: cur.byState.Copy(), byJob: cur.byJob.Copy(),
		byDrv: cur.byDrv.Copy(), versions: cur.versions}
	return t, t.own(txn)
}

func (t *buildTable) own(txn *memdb.Txn) error {
	return t.tableRow.own(txn, tableBuildTable, t, func() { t.fresh = nil })
}

var buildProbes = sync.Pool{New: func() any { return new(pb.Build) }}

// get returns a stored build, or nil.
func (t *buildTable) get(id uint64) *pb.Build {
	probe := buildProbes.Get().(*pb.Build)
	probe.Id = id
	b, _ := t.byID.Get(probe)
	probe.Id = 0
	buildProbes.Put(probe)
	return b
}

// maxID is the highest build id (0 with no builds).
func (t *buildTable) maxID() uint64 {
	b, ok := t.byID.Max()
	if !ok {
		return 0
	}
	return b.Id
}

// ofDrv calls fn for each build whose top-level derivation is drv, in id
// order, until it returns false.
func (t *buildTable) ofDrv(drv string, fn func(*pb.Build) bool) {
	probe := buildProbes.Get().(*pb.Build)
	probe.DrvPath = drv
	t.byDrv.Ascend(probe, func(b *pb.Build) bool { return b.DrvPath == drv && fn(b) })
	probe.DrvPath = ""
	buildProbes.Put(probe)
}

// inState calls fn for each build in a state, in id order, until it
// returns false.
func (t *buildTable) inState(s pb.BuildState, fn func(*pb.Build) bool) {
	t.byState.Ascend(&pb.Build{State: s}, func(b *pb.Build) bool { return b.State == s && fn(b) })
}

// put stores b (a new record, never one already stored), replacing the
// build of its id.
func (t *buildTable) put(b *pb.Build) {
	old, had := t.byID.Set(b)
	if had {
		t.byState.Delete(old)
		t.byJob.Delete(old)
		t.byDrv.Delete(old)
		t.touch(old)
	}
	t.byState.Set(b)
	t.byJob.Set(b)
	t.byDrv.Set(b)
	t.touch(b)
}

func (t *buildTable) touch(b *pb.Build) {
	for _, k := range [...]string{rangeAll, rangeState(b.State), rangeProject(b.Project)} {
		if t.fresh[k] {
			continue
		}
		if t.fresh == nil {
			t.fresh = map[string]bool{}
			t.versions = maps.Clone(t.versions) // the published version's map is shared
		}
		t.fresh[k] = true
		t.versions[k] = new(rangeVersion)
	}
}

// version is the token of the range of builds a filter reads.
func (t *buildTable) version(f BuildFilter) *rangeVersion {
	k := rangeAll
	switch {
	case f.Project != "":
		k = rangeProject(f.Project)
	case f.State != pb.BuildState_BUILD_STATE_UNSPECIFIED:
		k = rangeState(f.State)
	}
	v, ok := t.versions[k]
	if !ok {
		// Never written: empty. Every such range shares the token of
		// "nothing written yet", replaced with the table's first write.
		v = t.versions[rangeAll]
	}
	return v
}

// newestFirst calls fn for the builds a filter's index range holds, newest
// (highest id) first within each job, until it returns false. The range is
// the narrowest the filter names; fn still has to match the rest.
func (t *buildTable) newestFirst(f BuildFilter, fn func(*pb.Build) bool) {
	switch {
	case f.Project != "" && f.Jobset != "" && f.Job != "":
		t.byJob.Descend(&pb.Build{Project: f.Project, Jobset: f.Jobset, Job: f.Job, Id: math.MaxUint64}, func(b *pb.Build) bool {
			return b.Project == f.Project && b.Jobset == f.Jobset && b.Job == f.Job && fn(b)
		})
	case f.Project != "" && f.Jobset != "":
		// Names hold no NUL, so p, j+"\x00" sorts after every job of (p, j)
		// and before anything else.
		t.byJob.Descend(&pb.Build{Project: f.Project, Jobset: f.Jobset + "\x00"}, func(b *pb.Build) bool {
			return b.Project == f.Project && b.Jobset == f.Jobset && fn(b)
		})
	case f.Project != "":
		t.byJob.Descend(&pb.Build{Project: f.Project + "\x00"}, func(b *pb.Build) bool {
			return b.Project == f.Project && fn(b)
		})
	case f.State != pb.BuildState_BUILD_STATE_UNSPECIFIED:
		t.byState.Descend(&pb.Build{State: f.State, Id: math.MaxUint64}, func(b *pb.Build) bool {
			return b.State == f.State && fn(b)
		})
	default:
		t.byID.Reverse(fn)
	}
}
