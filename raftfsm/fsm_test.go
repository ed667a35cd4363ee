package raftfsm

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"testing"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/raft"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

const (
	submitT   = pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD
	cancelT   = pb.CommandType_COMMAND_TYPE_CANCEL_BUILD
	grantT    = pb.CommandType_COMMAND_TYPE_GRANT_LEASE
	completeT = pb.CommandType_COMMAND_TYPE_COMPLETE_LEASE
	expireT   = pb.CommandType_COMMAND_TYPE_EXPIRE_LEASE
)

func submit(id uint64, top string, graph ...*pb.DerivationNode) *pb.SubmitBuild {
	return &pb.SubmitBuild{Build: &pb.Build{Id: id, DrvPath: drv(top)}, Graph: graph}
}

func (a *applier) state(name string) pb.StepState {
	a.t.Helper()
	s, err := a.f.Read().Step(drv(name))
	if err != nil {
		a.t.Fatal(err)
	}
	return s.State
}

func (a *applier) build(id uint64) *pb.Build {
	a.t.Helper()
	b, err := a.f.Read().Build(id)
	if err != nil {
		a.t.Fatal(err)
	}
	return b
}

func (a *applier) grant(name string) uint64 {
	a.t.Helper()
	r := a.one(grantT, &pb.GrantLease{AgentId: "a1", DrvPath: drv(name), TtlSeconds: 30})
	if r.Err != nil {
		a.t.Fatalf("grant %s: %v", name, r.Err)
	}
	return r.ID
}

func (a *applier) complete(lease uint64, o pb.LeaseOutcome) error {
	a.t.Helper()
	return a.one(completeT, &pb.CompleteLease{LeaseId: lease, Outcome: o, Error: "boom", MaxTries: 3, BackoffSeconds: 10}).Err
}

// diamond: a <- b, a <- c, {b,c} <- d, d <- e (chain on top).
func diamond() []*pb.DerivationNode {
	return []*pb.DerivationNode{node("a"), node("b", "a"), node("c", "a"), node("d", "b", "c"), node("e", "d")}
}

func TestSubmitRejectsBadInputAndChangesNothing(t *testing.T) {
	cases := []struct {
		name string
		m    *pb.SubmitBuild
		want error
	}{
		{"malformed store path", &pb.SubmitBuild{Build: &pb.Build{Id: 9, DrvPath: "/nix/store/short.drv"}}, ErrInvalid},
		{"not a derivation", &pb.SubmitBuild{Build: &pb.Build{Id: 9, DrvPath: storePath("x")}}, ErrInvalid},
		{"outside the store", &pb.SubmitBuild{Build: &pb.Build{Id: 9, DrvPath: "/tmp/" + drv("x")[11:]}}, ErrInvalid},
		{"root not in graph", submit(9, "zz", node("a")), ErrInvalid},
		{"input not in graph", submit(9, "y", node("y", "missing")), ErrInvalid},
		{"cycle", submit(9, "p", node("p", "q"), node("q", "p")), ErrInvalid},
		{"self cycle", submit(9, "p", node("p", "p")), ErrInvalid},
		{"duplicate node", submit(9, "a", node("a"), node("a")), ErrInvalid},
		{"id not stamped", submit(0, "a", node("a")), ErrInvalid},
		{"existing id", submit(1, "k", node("k")), ErrConflict},
		{"bad system", submit(9, "s", &pb.DerivationNode{DrvPath: drv("s"), System: "x 86", Outputs: []*pb.Output{{Name: "out", Path: storePath("s")}}}), ErrInvalid},
		{"no outputs", submit(9, "s", &pb.DerivationNode{DrvPath: drv("s"), System: "x86_64-linux"}), ErrInvalid},
		{"bad job name", &pb.SubmitBuild{Build: &pb.Build{Id: 9, DrvPath: drv("a"), Job: "../x"}, Graph: []*pb.DerivationNode{node("a")}}, ErrInvalid},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t)
			if r := a.one(submitT, submit(1, "a", node("a"))); r.Err != nil {
				t.Fatal(r.Err)
			}
			before := a.dump()
			r := a.one(submitT, tt.m)
			if !errors.Is(r.Err, tt.want) {
				t.Fatalf("error %v, want %v", r.Err, tt.want)
			}
			if diff := diffDumps(before, a.dump()); diff != "" {
				t.Fatalf("a refused submission changed the state:\n%s", diff)
			}
		})
	}
}

func TestFailedCommandInSharedEntryLeavesNoTrace(t *testing.T) {
	a := newApplier(t)
	res := a.apply(
		cmd(t, submitT, submit(1, "a", node("a")), 1),
		cmd(t, submitT, submit(2, "y", node("y", "missing")), 1), // fails
		cmd(t, submitT, submit(3, "b", node("b", "a")), 1),
	)
	got := []string{Kind(res[0].Err), Kind(res[1].Err), Kind(res[2].Err)}
	if diff := cmp.Diff([]string{"", "invalid", ""}, got); diff != "" {
		t.Fatalf("results (-want +got):\n%s", diff)
	}
	b := New(nil)
	for _, m := range []*pb.SubmitBuild{submit(1, "a", node("a")), submit(3, "b", node("b", "a"))} {
		data, _ := EncodeEntry([]*pb.Command{cmd(t, submitT, m, 1)})
		b.Apply(&raft.Log{Type: raft.LogCommand, Index: 1, Data: data})
	}
	db, _ := b.Read().Dump()
	if diff := diffDumps(db, a.dump()); diff != "" {
		t.Fatalf("state differs from applying only the good commands:\n%s", diff)
	}
}

func TestSchedulingDiamondAndChain(t *testing.T) {
	a := newApplier(t)
	if r := a.one(submitT, submit(1, "e", diamond()...)); r.Err != nil {
		t.Fatal(r.Err)
	}
	// A second build shares steps b and a.
	if r := a.one(submitT, submit(2, "b", node("b", "a"), node("a"))); r.Err != nil {
		t.Fatal(r.Err)
	}
	states := func() map[string]pb.StepState {
		m := map[string]pb.StepState{}
		for _, n := range []string{"a", "b", "c", "d", "e"} {
			m[n] = a.state(n)
		}
		return m
	}
	W, R, S := pb.StepState_STEP_STATE_WAITING, pb.StepState_STEP_STATE_RUNNABLE, pb.StepState_STEP_STATE_SUCCEEDED
	want := map[string]pb.StepState{"a": R, "b": W, "c": W, "d": W, "e": W}
	if diff := cmp.Diff(want, states()); diff != "" {
		t.Fatalf("only the leaf is runnable at first (-want +got):\n%s", diff)
	}
	if s, _ := a.f.Read().Step(drv("a")); s.Refs != 2 {
		t.Fatalf("shared step a has refs %d, want 2", s.Refs)
	}
	if r := a.one(grantT, &pb.GrantLease{AgentId: "x", DrvPath: drv("b"), TtlSeconds: 30}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("grant of a waiting step: %v, want ErrConflict", r.Err)
	}
	for _, step := range []string{"a", "b", "c", "d", "e"} {
		l := a.grant(step)
		if err := a.complete(l, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); err != nil {
			t.Fatal(err)
		}
		if step == "b" {
			if b := a.build(2); b.State != pb.BuildState_BUILD_STATE_FINISHED || b.BuildStatus != 0 || len(b.Outputs) != 1 {
				t.Fatalf("build 2 after b succeeded: %v", b)
			}
			if a.state("d") != W || a.state("c") != R {
				t.Fatalf("after a and b: c %s, d %s", a.state("c"), a.state("d"))
			}
		}
	}
	want = map[string]pb.StepState{"a": S, "b": S, "c": S, "d": S, "e": S}
	if diff := cmp.Diff(want, states()); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	if b := a.build(1); b.BuildStatus != 0 || b.State != pb.BuildState_BUILD_STATE_FINISHED {
		t.Fatalf("build 1: %v", b)
	}
	if leases, _ := a.f.Read().Leases(); len(leases) != 0 {
		t.Fatalf("%d leases left after every step completed", len(leases))
	}
	// Already built: a new build of e finishes at once.
	if r := a.one(submitT, submit(3, "e", diamond()...)); r.Err != nil || a.build(3).State != pb.BuildState_BUILD_STATE_FINISHED {
		t.Fatalf("build of a built derivation: %v %v", r.Err, a.build(3))
	}
}

func TestFailuresGiveHydraStatuses(t *testing.T) {
	cases := []struct {
		name       string
		outcome    pb.LeaseOutcome
		own, dep   int32
		wantReason string
	}{
		{"build failure", pb.LeaseOutcome_LEASE_OUTCOME_FAILED, 1, 2, "boom"},
		{"timeout", pb.LeaseOutcome_LEASE_OUTCOME_TIMED_OUT, 7, 2, "boom"},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t)
			a.one(submitT, submit(1, "b", node("b", "a"), node("a"))) // own: b
			a.one(submitT, submit(2, "a", node("a")))                 // own: a
			a.one(submitT, submit(3, "c", node("c", "b"), node("b", "a"), node("a")))
			if err := a.complete(a.grant("a"), tt.outcome); err != nil {
				t.Fatal(err)
			}
			got := []int32{a.build(2).BuildStatus, a.build(1).BuildStatus, a.build(3).BuildStatus}
			if diff := cmp.Diff([]int32{tt.own, tt.dep, tt.dep}, got); diff != "" {
				t.Fatalf("statuses of builds 2 (own), 1 and 3 (dependents) (-want +got):\n%s", diff)
			}
			if a.build(2).Reason != tt.wantReason {
				t.Fatalf("reason %q", a.build(2).Reason)
			}
		})
	}
}

func TestTransientFailuresRetryThenAbort(t *testing.T) {
	a := newApplier(t)
	a.one(submitT, submit(1, "a", node("a")))
	for try := 1; try <= 3; try++ {
		l := a.grant("a")
		if err := a.complete(l, pb.LeaseOutcome_LEASE_OUTCOME_TRANSIENT); err != nil {
			t.Fatal(err)
		}
		s, _ := a.f.Read().Step(drv("a"))
		if try < 3 {
			if s.State != pb.StepState_STEP_STATE_RUNNABLE || s.Tries != uint32(try) || s.NotBefore != a.now+10 {
				t.Fatalf("after try %d: %v", try, s)
			}
			// A grant during the backoff is refused.
			if r := a.one(grantT, &pb.GrantLease{AgentId: "x", DrvPath: drv("a")}); !errors.Is(r.Err, ErrConflict) {
				t.Fatalf("grant during backoff: %v", r.Err)
			}
			a.now += 20
		}
	}
	if b := a.build(1); b.BuildStatus != 3 {
		t.Fatalf("after max tries: build status %d, want 3 (aborted); %v", b.BuildStatus, b)
	}
}

func TestLeaseFencing(t *testing.T) {
	a := newApplier(t)
	a.one(submitT, submit(1, "b", node("b", "a"), node("a")))
	l1 := a.grant("a")
	if r := a.one(expireT, &pb.ExpireLease{LeaseId: l1, MaxTries: 5}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if err := a.complete(l1, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); !errors.Is(err, ErrStaleLease) {
		t.Fatalf("completion under an expired lease: %v, want ErrStaleLease", err)
	}
	l2 := a.grant("a")
	if l2 <= l1 {
		t.Fatalf("lease ids must grow: %d then %d", l1, l2)
	}
	if err := a.complete(l2, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); err != nil {
		t.Fatal(err)
	}
	before := a.dump()
	if err := a.complete(l2, pb.LeaseOutcome_LEASE_OUTCOME_FAILED); err != nil {
		t.Fatalf("repeated completion: %v, want a no-op", err)
	}
	if diff := diffDumps(before, a.dump()); diff != "" {
		t.Fatalf("repeated completion changed the state:\n%s", diff)
	}
	if err := a.complete(999999, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); !errors.Is(err, ErrStaleLease) {
		t.Fatalf("unknown lease: %v", err)
	}
}

func TestCancelKeepsSharedSteps(t *testing.T) {
	a := newApplier(t)
	a.one(submitT, submit(1, "b", node("b", "a"), node("a")))
	a.one(submitT, submit(2, "c", node("c", "a"), node("a")))
	la := a.grant("a")
	if r := a.one(cancelT, &pb.CancelBuild{Id: 1}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if b := a.build(1); b.BuildStatus != 4 || b.State != pb.BuildState_BUILD_STATE_FINISHED {
		t.Fatalf("cancelled build: %v", b)
	}
	if a.state("b") != pb.StepState_STEP_STATE_CANCELLED || a.state("a") != pb.StepState_STEP_STATE_LEASED {
		t.Fatalf("b %s (want cancelled), a %s (want still leased: build 2 needs it)", a.state("b"), a.state("a"))
	}
	if r := a.one(cancelT, &pb.CancelBuild{Id: 1}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("cancelling twice: %v", r.Err)
	}
	if r := a.one(cancelT, &pb.CancelBuild{Id: 2}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if a.state("a") != pb.StepState_STEP_STATE_CANCELLED {
		t.Fatalf("a is %s after every build needing it was cancelled", a.state("a"))
	}
	if err := a.complete(la, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); !errors.Is(err, ErrStaleLease) {
		t.Fatalf("completion of a cancelled step: %v", err)
	}
	if r := a.one(cancelT, &pb.CancelBuild{Id: 77}); !errors.Is(r.Err, ErrNotFound) {
		t.Fatalf("unknown build: %v", r.Err)
	}
	// Resubmitting starts a fresh attempt.
	a.one(submitT, submit(3, "c", node("c", "a"), node("a")))
	if a.state("a") != pb.StepState_STEP_STATE_RUNNABLE || a.state("c") != pb.StepState_STEP_STATE_WAITING {
		t.Fatalf("after resubmission: a %s, c %s", a.state("a"), a.state("c"))
	}
}

func TestUndecodableAndUnknownCommandsPanic(t *testing.T) {
	cases := []struct {
		name string
		data []byte
	}{
		{"garbage entry", []byte{0xff, 0xff, 0xff}},
		{"unknown command", mustEntry(t, &pb.Command{Type: pb.CommandType(777), Payload: nil})},
		{"undecodable payload", mustEntry(t, &pb.Command{Type: submitT, Payload: []byte{0xff, 0x01}})},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			New(nil).Apply(&raft.Log{Type: raft.LogCommand, Index: 1, Data: tt.data})
		})
	}
	// An unknown command marked ignorable is skipped.
	a := newApplier(t)
	res := a.apply(&pb.Command{Type: pb.CommandType(777), Ignorable: true}, cmd(t, submitT, submit(1, "a", node("a")), 1))
	if !errors.Is(res[0].Err, ErrUnknownCommand) || res[1].Err != nil {
		t.Fatalf("results %v", res)
	}
}

func mustEntry(t *testing.T, c *pb.Command) []byte {
	t.Helper()
	b, err := EncodeEntry([]*pb.Command{c})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRestoreRefusesBadSnapshotsAndKeepsState(t *testing.T) {
	a := newApplier(t)
	a.one(submitT, submit(1, "b", node("b", "a"), node("a")))
	good := snapshotBytes(t, a.f)
	before := a.dump()
	bad := map[string][]byte{
		"garbage":       []byte("not a snapshot"),
		"truncated":     good[:len(good)-5],
		"wrong version": append([]byte(snapshotMagic), 0x02, 0x08, 0x09),
		"empty":         nil,
	}
	for name, b := range bad {
		t.Run(name, func(t *testing.T) {
			if err := a.f.Restore(io.NopCloser(bytes.NewReader(b))); err == nil {
				t.Fatal("restore accepted a bad snapshot")
			}
			if diff := diffDumps(before, a.dump()); diff != "" {
				t.Fatalf("a failed restore changed the state:\n%s", diff)
			}
		})
	}
}

func TestStatusOf(t *testing.T) {
	cases := []struct {
		err    error
		status int
		code   connect.Code
	}{
		{ErrInvalid, http.StatusBadRequest, connect.CodeInvalidArgument},
		{ErrNotFound, http.StatusNotFound, connect.CodeNotFound},
		{ErrConflict, http.StatusConflict, connect.CodeAlreadyExists},
		{ErrStaleLease, http.StatusConflict, connect.CodeFailedPrecondition},
		{ErrTooLarge, http.StatusRequestEntityTooLarge, connect.CodeResourceExhausted},
		{ErrUnauthenticated, http.StatusUnauthorized, connect.CodeUnauthenticated},
		{ErrForbidden, http.StatusForbidden, connect.CodePermissionDenied},
		{ErrNoLeader, http.StatusServiceUnavailable, connect.CodeUnavailable},
		{errors.New("other"), http.StatusInternalServerError, connect.CodeInternal},
	}
	for _, tt := range cases {
		wrapped := errors.Join(errors.New("context"), tt.err)
		st, code := StatusOf(wrapped)
		if st != tt.status || code != tt.code {
			t.Errorf("%v: %d %v, want %d %v", tt.err, st, code, tt.status, tt.code)
		}
		// Kind/FromKind carry it across a hop.
		if back := FromKind(Kind(tt.err), "msg"); tt.status != 500 && !errors.Is(back, tt.err) {
			t.Errorf("%v does not survive Kind/FromKind", tt.err)
		}
	}
}

// TestReleasedLeaseIsNotATry: a step handed back by a draining agent is
// runnable again at once, its tries unchanged, with a new attempt number.
func TestReleasedLeaseIsNotATry(t *testing.T) {
	a := newApplier(t)
	a.one(submitT, submit(1, "a", node("a")))
	for i := 1; i <= 5; i++ {
		l := a.grant("a")
		if err := a.complete(l, pb.LeaseOutcome_LEASE_OUTCOME_RELEASED); err != nil {
			t.Fatal(err)
		}
		s, _ := a.f.Read().Step(drv("a"))
		if s.State != pb.StepState_STEP_STATE_RUNNABLE || s.Tries != 0 || s.NotBefore != 0 || s.Attempts != uint32(i) {
			t.Fatalf("after hand-back %d: %v", i, s)
		}
		if err := a.complete(l, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED); !errors.Is(err, ErrStaleLease) {
			t.Fatalf("completion under a handed-back lease: %v", err)
		}
	}
	if b := a.build(1); b.State != pb.BuildState_BUILD_STATE_QUEUED {
		t.Fatalf("build after hand-backs: %v", b)
	}
}
