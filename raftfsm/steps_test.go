package raftfsm

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-memdb"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/testing/protocmp"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// fired reports whether any channel of a watch set is closed.
func fired(ws memdb.WatchSet) bool {
	for ch := range ws {
		select {
		case <-ch:
			return true
		default:
		}
	}
	return false
}

// TestStepWatch: a long-poll waiting for runnable work of a system wakes
// when such work changes, and only then.
func TestStepWatch(t *testing.T) {
	x86 := &pb.Agent{Systems: []string{"x86_64-linux"}}
	arm := &pb.Agent{Systems: []string{"aarch64-linux"}}
	tests := []struct {
		name     string
		before   []*pb.DerivationNode // submitted before the watch starts
		change   func(a *applier)
		x86, arm bool // whether each agent's long-poll wakes
	}{
		{"first step of a system ever", nil, func(a *applier) { a.submitNode(featNode("n", "x86_64-linux")) }, true, true},
		{"runnable x86 step queued", []*pb.DerivationNode{featNode("a", "aarch64-linux"), featNode("x", "x86_64-linux")},
			func(a *applier) { a.submitNode(featNode("n", "x86_64-linux")) }, true, false},
		{"runnable arm step queued", []*pb.DerivationNode{featNode("a", "aarch64-linux"), featNode("x", "x86_64-linux")},
			func(a *applier) { a.submitNode(featNode("n", "aarch64-linux")) }, false, true},
		{"x86 step leased", []*pb.DerivationNode{featNode("a", "aarch64-linux"), featNode("x", "x86_64-linux")},
			func(a *applier) { a.grant("x") }, true, false},
		{"a failed command changes nothing", []*pb.DerivationNode{featNode("a", "aarch64-linux"), featNode("x", "x86_64-linux")},
			func(a *applier) {
				if r := a.one(grantT, &pb.GrantLease{AgentId: "a1", DrvPath: drv("missing"), TtlSeconds: 30}); r.Err == nil {
					a.t.Fatal("grant of an unknown step succeeded")
				}
			}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t)
			for _, n := range tt.before {
				a.submitNode(n)
			}
			wsX, wsA := memdb.NewWatchSet(), memdb.NewWatchSet()
			r := a.f.Read()
			if _, err := r.PickRunnable(wsX, x86, a.now, 1, nil, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := r.PickRunnable(wsA, arm, a.now, 1, nil, nil); err != nil {
				t.Fatal(err)
			}
			tt.change(a)
			if got := fired(wsX); got != tt.x86 {
				t.Errorf("x86 long-poll woke: %v, want %v", got, tt.x86)
			}
			if got := fired(wsA); got != tt.arm {
				t.Errorf("arm long-poll woke: %v, want %v", got, tt.arm)
			}
		})
	}
}

func (a *applier) submitNode(n *pb.DerivationNode) {
	a.t.Helper()
	a.index++ // build ids need only be unique
	m := submit(a.index, "", n)
	m.Build.DrvPath = n.DrvPath
	if r := a.one(submitT, m); r.Err != nil {
		a.t.Fatal(r.Err)
	}
}

// TestStepVersions: a reader keeps the steps of its own version while
// later entries change them, and an aborted transaction leaves neither
// steps nor watch channels changed.
func TestStepVersions(t *testing.T) {
	a := newApplier(t)
	a.submitNode(node("s"))
	old := a.f.Read()
	lease := a.grant("s")

	s, err := old.Step(drv("s"))
	if err != nil {
		t.Fatal(err)
	}
	if s.State != pb.StepState_STEP_STATE_RUNNABLE || s.LeaseId != 0 {
		t.Errorf("old reader sees state %s, lease %d; want runnable, no lease", s.State, s.LeaseId)
	}
	var oldRunnable, newRunnable []string
	for _, st := range []struct {
		r   *Reader
		out *[]string
	}{{old, &oldRunnable}, {a.f.Read(), &newRunnable}} {
		each, err := st.r.StepsIn(nil, pb.StepState_STEP_STATE_RUNNABLE)
		if err != nil {
			t.Fatal(err)
		}
		each(func(s StepRef) bool { *st.out = append(*st.out, s.DrvPath()); return true })
	}
	if d := cmp.Diff([]string{drv("s")}, oldRunnable); d != "" {
		t.Errorf("old reader's runnable steps (-want +got):\n%s", d)
	}
	if len(newRunnable) != 0 {
		t.Errorf("new reader's runnable steps: %v, want none", newRunnable)
	}
	if s, err := a.f.Read().Step(drv("s")); err != nil || s.LeaseId != lease {
		t.Errorf("new reader: step %v, %v; want lease %d", s, err, lease)
	}

	// An aborted write: nothing it put is seen, no channel closes.
	a.f.mu.RLock()
	db := a.f.db
	a.f.mu.RUnlock()
	before := a.f.Read()
	ch := readSteps(before.txn).watchCh(watchKey{pb.StepState_STEP_STATE_RUNNABLE, "x86_64-linux"})
	txn := db.Txn(true)
	st, err := writeSteps(txn)
	if err != nil {
		t.Fatal(err)
	}
	st.put(txn, &pb.Step{DrvPath: drv("ghost"), System: "x86_64-linux", State: pb.StepState_STEP_STATE_RUNNABLE}, nil)
	if readSteps(txn).get(drv("ghost")) == nil {
		t.Fatal("the writing transaction does not see its own step")
	}
	txn.Abort()
	if _, err := a.f.Read().Step(drv("ghost")); err == nil {
		t.Error("an aborted step is visible")
	}
	select {
	case <-ch:
		t.Error("an aborted write closed a watch channel")
	default:
	}
	// The same write committed: visible, and the channel closes.
	txn = db.Txn(true)
	if st, err = writeSteps(txn); err != nil {
		t.Fatal(err)
	}
	st.put(txn, &pb.Step{DrvPath: drv("ghost"), System: "x86_64-linux", State: pb.StepState_STEP_STATE_RUNNABLE}, nil)
	txn.Commit()
	if _, err := a.f.Read().Step(drv("ghost")); err != nil {
		t.Errorf("committed step: %v", err)
	}
	select {
	case <-ch:
	default:
		t.Error("a committed write left the group's watch channel open")
	}
	if _, err := before.Step(drv("ghost")); err == nil {
		t.Error("a reader taken before the write sees its step")
	}
}

// TestBuildRanges: each filter's listing holds exactly the builds it
// matches, in its index's order (newest first within a job), also for
// names that are prefixes of one another.
func TestBuildRanges(t *testing.T) {
	a := newApplier(t)
	names := []struct{ p, j, job string }{
		{"p", "j", "a"}, {"p", "j", "ab"}, {"p", "j2", "a"}, {"p", "j", "a"}, {"p-x", "j", "a"},
		{"pa", "j", "a"}, {"", "", ""}, {"p", "jj", "a"}, {"p", "j", "a"},
	}
	for i, n := range names {
		name := fmt.Sprint("b", i)
		m := submit(uint64(i+1), name, node(name))
		m.Build.Project, m.Build.Jobset, m.Build.Job = n.p, n.j, n.job
		if r := a.one(submitT, m); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	if r := a.one(cancelT, &pb.CancelBuild{Id: 4}); r.Err != nil {
		t.Fatal(r.Err)
	}
	d := a.dump()
	tests := []struct {
		name string
		f    BuildFilter
		key  func(*pb.Build) string // the index's order, compared descending
	}{
		{"all", BuildFilter{}, nil},
		{"queued", BuildFilter{State: pb.BuildState_BUILD_STATE_QUEUED}, nil},
		{"project p", BuildFilter{Project: "p"}, func(b *pb.Build) string { return b.Jobset + "\x00" + b.Job }},
		{"jobset p/j", BuildFilter{Project: "p", Jobset: "j"}, func(b *pb.Build) string { return b.Job }},
		{"job p/j/a", BuildFilter{Project: "p", Jobset: "j", Job: "a"}, nil},
		{"job p/j/a finished", BuildFilter{Project: "p", Jobset: "j", Job: "a", State: pb.BuildState_BUILD_STATE_FINISHED}, nil},
		{"no such project", BuildFilter{Project: "q"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want []uint64
			for i := len(d.Builds) - 1; i >= 0; i-- { // dump is in id order
				if b := d.Builds[i]; tt.f.match(b) {
					want = append(want, b.Id)
				}
			}
			if tt.key != nil {
				byID := map[uint64]*pb.Build{}
				for _, b := range d.Builds {
					byID[b.Id] = b
				}
				slices.SortStableFunc(want, func(x, y uint64) int { return strings.Compare(tt.key(byID[y]), tt.key(byID[x])) })
			}
			bs, total, err := a.f.Read().Builds(tt.f, 0, 100)
			if err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for _, b := range bs {
				got = append(got, b.Id)
			}
			if diff := cmp.Diff(want, got); diff != "" || total != len(want) {
				t.Errorf("listing (-want +got):\n%s\ntotal %d, want %d", diff, total, len(want))
			}
		})
	}
}

// TestStepRecRoundTrip: the stored form keeps every field of pb.Step. The
// record is filled through reflection, so a field added to the message
// and not to stepRec fails here.
func TestStepRecRoundTrip(t *testing.T) {
	s := &pb.Step{}
	m := s.ProtoReflect()
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		switch {
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			l := m.Mutable(fd).List()
			for k := 0; k < 2; k++ {
				o := l.NewElement()
				o.Message().Set(o.Message().Descriptor().Fields().ByName("name"), protoreflect.ValueOfString(fmt.Sprint("out", k)))
				o.Message().Set(o.Message().Descriptor().Fields().ByName("path"), protoreflect.ValueOfString(storePath(fmt.Sprint("o", k))))
				l.Append(o)
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			l.Append(protoreflect.ValueOfString(fmt.Sprint(fd.Name(), "-a")))
			l.Append(protoreflect.ValueOfString(fmt.Sprint(fd.Name(), "-b")))
		case fd.Kind() == protoreflect.StringKind:
			m.Set(fd, protoreflect.ValueOfString(string(fd.Name())))
		case fd.Kind() == protoreflect.EnumKind:
			m.Set(fd, protoreflect.ValueOfEnum(protoreflect.EnumNumber(3)))
		case fd.Kind() == protoreflect.Uint32Kind:
			m.Set(fd, protoreflect.ValueOfUint32(uint32(100+i)))
		case fd.Kind() == protoreflect.Int32Kind:
			m.Set(fd, protoreflect.ValueOfInt32(int32(-100-i)))
		case fd.Kind() == protoreflect.Uint64Kind:
			m.Set(fd, protoreflect.ValueOfUint64(uint64(1<<40+i)))
		case fd.Kind() == protoreflect.Int64Kind:
			m.Set(fd, protoreflect.ValueOfInt64(int64(-(1<<40)-i)))
		default:
			t.Fatalf("field %s of kind %s: teach this test (and stepRec) about it", fd.Name(), fd.Kind())
		}
	}
	for _, clone := range []bool{false, true} {
		var strs interner
		for _, in := range []*interner{nil, &strs} {
			got := recOf(s, in).step(clone)
			if d := cmp.Diff(s, got, protocmp.Transform()); d != "" {
				t.Errorf("clone %v, interner %v: round trip (-want +got):\n%s", clone, in != nil, d)
			}
		}
	}
	// A clone's slices are its own.
	c := recOf(s, nil).step(true)
	c.Dependents[0], c.InputDrvs[0], c.RequiredFeatures[0] = "x", "x", "x"
	if s.Dependents[0] == "x" || s.InputDrvs[0] == "x" || s.RequiredFeatures[0] == "x" {
		t.Error("changing a clone changed the stored record")
	}
}
