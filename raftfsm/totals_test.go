package raftfsm

import (
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// TestBuildTotalsFollowChanges: list totals remembered between reads are
// the totals a fresh count gives, after every kind of change, for every
// filter and page.
func TestBuildTotalsFollowChanges(t *testing.T) {
	a := newApplier(t)
	finished := pb.BuildState_BUILD_STATE_FINISHED
	filters := map[string]BuildFilter{
		"all":       {},
		"queued":    {State: pb.BuildState_BUILD_STATE_QUEUED},
		"finished":  {State: finished},
		"cancelled": {State: finished, Statuses: []int32{4}},
		"system":    {System: "x86_64-linux"},
		"no match":  {Project: "nope"},
	}
	type listing struct {
		IDs   []uint64
		Total int
	}
	list := func(r *Reader, f BuildFilter, offset, limit int) listing {
		bs, total, err := r.Builds(f, offset, limit)
		if err != nil {
			t.Fatal(err)
		}
		l := listing{Total: total}
		for _, b := range bs {
			l.IDs = append(l.IDs, b.Id)
		}
		return l
	}
	check := func(when string) {
		t.Helper()
		for name, f := range filters {
			for _, pg := range []struct{ offset, limit int }{{0, 2}, {2, 2}, {0, 100}, {7, 3}} {
				fresh := &Reader{txn: a.f.db.Txn(false)} // counts every time
				want := list(fresh, f, pg.offset, pg.limit)
				// Twice: the first read may count, the second uses what it remembered.
				for range 2 {
					if diff := cmp.Diff(want, list(a.f.Read(), f, pg.offset, pg.limit)); diff != "" {
						t.Fatalf("%s, filter %s, page %+v (-fresh +remembered):\n%s", when, name, pg, diff)
					}
				}
			}
		}
	}
	check("empty")
	for i := uint64(1); i <= 6; i++ {
		n := fmt.Sprint("t", i)
		if r := a.one(submitT, submit(i, n, node(n))); r.Err != nil {
			t.Fatal(r.Err)
		}
		check(fmt.Sprintf("after submitting build %d", i))
	}
	if r := a.one(cancelT, &pb.CancelBuild{Id: 2}); r.Err != nil {
		t.Fatal(r.Err)
	}
	check("after a cancel")
	if err := a.complete(a.grant("t3"), pb.LeaseOutcome_LEASE_OUTCOME_FAILED); err != nil {
		t.Fatal(err)
	}
	check("after a failure")
	if r := a.one(submitT, submit(7, "t7", node("t7"))); r.Err != nil {
		t.Fatal(r.Err)
	}
	check("after another submission")
}
