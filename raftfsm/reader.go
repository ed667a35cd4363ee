package raftfsm

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/go-memdb"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Reader is a consistent, read-only view of the state. Records it returns
// are shared: callers must not modify them.
type Reader struct {
	txn     *memdb.Txn
	abandon <-chan struct{}
	totals  *totals // nil: count every time
}

// Abandon is closed when the state is replaced by a snapshot restore;
// long-polls add it to their watch sets.
func (r *Reader) Abandon() <-chan struct{} { return r.abandon }

func first[T any](r *Reader, table, index string, args ...any) (T, error) {
	var zero T
	o, err := r.txn.First(table, index, args...)
	if err != nil || o == nil {
		return zero, err
	}
	return o.(T), nil
}

// Build returns one build or ErrNotFound.
func (r *Reader) Build(id uint64) (*pb.Build, error) {
	if b := readBuilds(r.txn).get(id); b != nil {
		return b, nil
	}
	return nil, fmt.Errorf("%w: build %d", ErrNotFound, id)
}

// MaxBuildID is the highest build ID in use (0 when none).
func (r *Reader) MaxBuildID() (uint64, error) {
	return readBuilds(r.txn).maxID(), nil
}

// BuildFilter selects builds; empty fields match everything.
type BuildFilter struct {
	Project, Jobset, Job string
	State                pb.BuildState // UNSPECIFIED matches both
	System               string
	// Statuses, when set, matches finished builds with one of these
	// Hydra codes.
	Statuses []int32
}

// NewBuildFilter makes a filter from API parameters; state is "queued",
// "finished" or empty for both, and anything else is ErrInvalid naming the
// valid values.
func NewBuildFilter(project, jobset, job, state string) (BuildFilter, error) {
	f := BuildFilter{Project: project, Jobset: jobset, Job: job}
	switch state {
	case "":
	case "queued":
		f.State = pb.BuildState_BUILD_STATE_QUEUED
	case "finished":
		f.State = pb.BuildState_BUILD_STATE_FINISHED
	default:
		return f, fmt.Errorf("%w: state %q: valid values are queued, finished", ErrInvalid, trunc(state))
	}
	return f, nil
}

func (f BuildFilter) match(b *pb.Build) bool {
	return (f.Project == "" || b.Project == f.Project) &&
		(f.Jobset == "" || b.Jobset == f.Jobset) &&
		(f.Job == "" || b.Job == f.Job) &&
		(f.State == pb.BuildState_BUILD_STATE_UNSPECIFIED || b.State == f.State) &&
		(f.System == "" || b.System == f.System) &&
		(f.Statuses == nil || b.State == pb.BuildState_BUILD_STATE_FINISHED && slices.Contains(f.Statuses, b.BuildStatus))
}

// Builds lists matching builds, newest first: the page [offset, offset+limit)
// and the total number that match.
func (r *Reader) Builds(f BuildFilter, offset, limit int) ([]*pb.Build, int, error) {
	// The total needs a walk of everything the index range holds; it is
	// remembered for this version of the range, so that paging through an
	// unchanged list walks only up to the page.
	t := readBuilds(r.txn)
	key, version := f.key(), t.version(f)
	known, haveTotal := r.totals.get(key, version)
	var page []*pb.Build
	total := 0
	t.newestFirst(f, func(b *pb.Build) bool {
		if !f.match(b) {
			return true
		}
		if total >= offset && len(page) < limit {
			page = append(page, b)
		}
		total++
		return !haveTotal || total < offset+limit
	})
	if haveTotal {
		return page, known, nil
	}
	r.totals.put(key, version, total)
	return page, total, nil
}

// key identifies the filter in the totals cache.
func (f BuildFilter) key() string {
	var b strings.Builder
	for _, s := range []string{f.Project, f.Jobset, f.Job, f.System} {
		b.WriteString(strconv.Quote(s))
	}
	b.WriteString(strconv.Itoa(int(f.State)))
	for _, st := range f.Statuses {
		b.WriteString(",")
		b.WriteString(strconv.Itoa(int(st)))
	}
	return b.String()
}

// totals remembers how many builds matched a filter in one version of the
// range it was counted in. A range's token is replaced by any write to it,
// so an entry found under the same token is exact.
type totals struct {
	mu sync.Mutex
	m  map[string]countedTotal
}

type countedTotal struct {
	version *rangeVersion
	n       int
}

// maxTotals bounds the cache; it is emptied when full.
const maxTotals = 256

func (t *totals) get(key string, version *rangeVersion) (int, bool) {
	if t == nil || version == nil {
		return 0, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[key]
	return c.n, ok && c.version == version
}

func (t *totals) put(key string, version *rangeVersion, n int) {
	if t == nil || version == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil || len(t.m) >= maxTotals {
		t.m = map[string]countedTotal{}
	}
	t.m[key] = countedTotal{version: version, n: n}
}

// BuildsOfDrv lists builds whose top-level derivation is drv.
func (r *Reader) BuildsOfDrv(drv string) ([]*pb.Build, error) {
	var out []*pb.Build
	readBuilds(r.txn).ofDrv(drv, func(b *pb.Build) bool {
		out = append(out, b)
		return true
	})
	return out, nil
}

// Step returns one step or ErrNotFound.
func (r *Reader) Step(drv string) (*pb.Step, error) {
	if s := readSteps(r.txn).get(drv); s != nil {
		return s.step(false), nil
	}
	return nil, fmt.Errorf("%w: step %s", ErrNotFound, drv)
}

// StepRef is a stored step read in place: its accessors copy nothing, and
// Step makes the protobuf record (callers must not change it).
type StepRef struct{ r *stepRec }

func (s StepRef) DrvPath() string            { return s.r.DrvPath }
func (s StepRef) System() string             { return s.r.System }
func (s StepRef) RequiredFeatures() []string { return s.r.RequiredFeatures }
func (s StepRef) Step() *pb.Step             { return s.r.step(false) }

// StepsIn iterates steps in a state, optionally of one system (and, with
// system given, one exact feature set), calling fn until it returns false.
// The group's watch channel is added to ws when ws is non-nil (for a
// feature set, its system's: it may wake more often than needed).
func (r *Reader) StepsIn(ws memdb.WatchSet, state pb.StepState, systemAndFeatures ...string) (func(fn func(StepRef) bool), error) {
	t := readSteps(r.txn)
	var system string
	var features []string
	if len(systemAndFeatures) > 0 {
		system = systemAndFeatures[0]
		if len(systemAndFeatures) > 1 {
			if features = strings.Split(systemAndFeatures[1], ","); systemAndFeatures[1] == "" {
				features = nil
			}
		}
	}
	if ws != nil {
		ws.Add(t.watchCh(watchKey{state, system}))
	}
	match := func(s *stepRec) bool {
		switch {
		case s.State != state:
			return false
		case len(systemAndFeatures) == 0:
			return true
		case s.System != system:
			return false
		}
		return len(systemAndFeatures) == 1 || slices.Equal(s.RequiredFeatures, features)
	}
	return func(fn func(StepRef) bool) {
		t.sched.Ascend(groupStart(state, system, features), func(s *stepRec) bool {
			return match(s) && fn(StepRef{s})
		})
	}, nil
}

// Lease returns an active lease or ErrNotFound.
func (r *Reader) Lease(id uint64) (*pb.Lease, error) {
	l, err := first[*pb.Lease](r, tableLeases, "id", id)
	if err == nil && l == nil {
		err = fmt.Errorf("%w: lease %d", ErrNotFound, id)
	}
	return l, err
}

// Leases lists active leases.
func (r *Reader) Leases() ([]*pb.Lease, error) { return all[*pb.Lease](r.txn.Get(tableLeases, "id")) }

// Project returns one project or ErrNotFound.
func (r *Reader) Project(name string) (*pb.Project, error) {
	p, err := first[*pb.Project](r, tableProjects, "id", name)
	if err == nil && p == nil {
		err = fmt.Errorf("%w: project %q", ErrNotFound, name)
	}
	return p, err
}

// Projects lists projects by name.
func (r *Reader) Projects() ([]*pb.Project, error) {
	return all[*pb.Project](r.txn.Get(tableProjects, "id"))
}

// Jobset returns one jobset or ErrNotFound.
func (r *Reader) Jobset(project, name string) (*pb.Jobset, error) {
	j, err := first[*pb.Jobset](r, tableJobsets, "id", project, name)
	if err == nil && j == nil {
		err = fmt.Errorf("%w: jobset %s:%s", ErrNotFound, project, name)
	}
	return j, err
}

// Jobsets lists a project's jobsets (all jobsets when project is empty).
func (r *Reader) Jobsets(project string) ([]*pb.Jobset, error) {
	if project == "" {
		return all[*pb.Jobset](r.txn.Get(tableJobsets, "id"))
	}
	return all[*pb.Jobset](r.txn.Get(tableJobsets, "id_prefix", project))
}

// Nodes lists the coordinators the cluster knows.
func (r *Reader) Nodes() ([]*pb.Node, error) { return all[*pb.Node](r.txn.Get(tableNodes, "id")) }

// Node returns one coordinator or ErrNotFound.
func (r *Reader) Node(id string) (*pb.Node, error) {
	n, err := first[*pb.Node](r, tableNodes, "id", id)
	if err == nil && n == nil {
		err = fmt.Errorf("%w: node %q", ErrNotFound, id)
	}
	return n, err
}

func all[T any](it memdb.ResultIterator, err error) ([]T, error) {
	if err != nil {
		return nil, err
	}
	var out []T
	for o := it.Next(); o != nil; o = it.Next() {
		out = append(out, o.(T))
	}
	return out, nil
}

// Dump is every record of the state, in key order: for tests and debugging.
type Dump struct {
	Nodes    []*pb.Node
	Projects []*pb.Project
	Jobsets  []*pb.Jobset
	Evals    []*pb.Eval
	Steps    []*pb.Step
	Builds   []*pb.Build
	Leases   []*pb.Lease
	NarInfos []*pb.NarInfo
	Logs     []*pb.LogRecord
	Pins     []*pb.Pin
	Agents   []*pb.Agent
	Users    []*pb.User
}

// Dump copies out the whole state.
func (r *Reader) Dump() (*Dump, error) {
	d := &Dump{}
	var err error
	if d.Nodes, err = r.Nodes(); err != nil {
		return nil, err
	}
	if d.Projects, err = r.Projects(); err != nil {
		return nil, err
	}
	if d.Jobsets, err = r.Jobsets(""); err != nil {
		return nil, err
	}
	if d.Evals, err = all[*pb.Eval](r.txn.Get(tableEvals, "id")); err != nil {
		return nil, err
	}
	readSteps(r.txn).each(func(s *stepRec) bool {
		d.Steps = append(d.Steps, s.step(false))
		return true
	})
	readBuilds(r.txn).byID.Scan(func(b *pb.Build) bool {
		d.Builds = append(d.Builds, b)
		return true
	})
	if d.Leases, err = r.Leases(); err != nil {
		return nil, err
	}
	if d.NarInfos, err = all[*pb.NarInfo](r.txn.Get(tableNarInfos, "id")); err != nil {
		return nil, err
	}
	if d.Logs, err = all[*pb.LogRecord](r.txn.Get(tableLogs, "id")); err != nil {
		return nil, err
	}
	if d.Pins, err = r.Pins(); err != nil {
		return nil, err
	}
	if d.Agents, err = r.Agents(); err != nil {
		return nil, err
	}
	if d.Users, err = r.Users(); err != nil {
		return nil, err
	}
	return d, nil
}

// NarInfo returns the record of the store path with this hash part, or ErrNotFound.
func (r *Reader) NarInfo(hashPart string) (*pb.NarInfo, error) {
	n, err := first[*pb.NarInfo](r, tableNarInfos, "id", hashPart)
	if err == nil && n == nil {
		err = fmt.Errorf("%w: no narinfo for %q", ErrNotFound, trunc(hashPart))
	}
	return n, err
}

// Log returns the latest attempt's log record of a derivation, or ErrNotFound.
func (r *Reader) Log(drvPath string) (*pb.LogRecord, error) {
	o, err := r.txn.Last(tableLogs, "id_prefix", drvPath)
	if err != nil {
		return nil, err
	}
	if o == nil {
		return nil, fmt.Errorf("%w: no log for %q", ErrNotFound, trunc(drvPath))
	}
	return o.(*pb.LogRecord), nil
}

// Logs lists every attempt's log record of a derivation, oldest first.
func (r *Reader) Logs(drvPath string) ([]*pb.LogRecord, error) {
	return all[*pb.LogRecord](r.txn.Get(tableLogs, "id_prefix", drvPath))
}

// Pins lists pinned paths.
func (r *Reader) Pins() ([]*pb.Pin, error) { return all[*pb.Pin](r.txn.Get(tablePins, "id")) }

// BlobReferenced reports whether a narinfo or log record names the blob.
func (r *Reader) BlobReferenced(blob string) (bool, error) {
	for _, t := range []string{tableNarInfos, tableLogs} {
		o, err := r.txn.First(t, "blob", blob)
		if err != nil {
			return false, err
		}
		if o != nil {
			return true, nil
		}
	}
	return false, nil
}

// EachBlob calls fn with every blob a record names (narinfo, then logs),
// in key order, until fn returns false. ws, when not nil, is told about
// changes to either table.
func (r *Reader) EachBlob(ws memdb.WatchSet, fn func(blob string) bool) error {
	for _, t := range []string{tableNarInfos, tableLogs} {
		it, err := r.txn.Get(t, "id")
		if err != nil {
			return err
		}
		if ws != nil {
			ws.Add(it.WatchCh())
		}
		for o := it.Next(); o != nil; o = it.Next() {
			var b string
			switch v := o.(type) {
			case *pb.NarInfo:
				b = v.Blob
			case *pb.LogRecord:
				b = v.Blob
			}
			if !fn(b) {
				return nil
			}
		}
	}
	return nil
}

// EachBuildNewestFirst calls fn on builds from the newest until it returns false.
func (r *Reader) EachBuildNewestFirst(fn func(*pb.Build) bool) error {
	readBuilds(r.txn).byID.Reverse(fn)
	return nil
}

// CacheTotals counts the cache's narinfo records and sums their NAR and
// compressed sizes.
func (r *Reader) CacheTotals() (n int, narBytes, fileBytes uint64, err error) {
	it, err := r.txn.Get(tableNarInfos, "id")
	if err != nil {
		return 0, 0, 0, err
	}
	for o := it.Next(); o != nil; o = it.Next() {
		ni := o.(*pb.NarInfo)
		n++
		narBytes += ni.NarSize
		fileBytes += ni.FileSize
	}
	return n, narBytes, fileBytes, nil
}
