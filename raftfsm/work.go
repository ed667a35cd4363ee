package raftfsm

import (
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// work holds the working copies of steps and builds that one command
// changes. Stored records are never mutated in place (readers share them);
// they are cloned on first touch and written back by flush.
type work struct {
	c      *applyCtx
	steps  map[string]*pb.Step
	builds map[uint64]*pb.Build
	// absent holds derivations looked up and not stored: a submission
	// asks about each new one several times (closure, queue, inputs).
	// Steps are only added through steps, which is checked first.
	absent map[string]bool
}

func newWork(c *applyCtx) *work {
	return &work{c: c, steps: map[string]*pb.Step{}, builds: map[uint64]*pb.Build{}}
}

// step returns the working copy of a step, or nil when there is none.
func (w *work) step(drv string) (*pb.Step, error) {
	if s, ok := w.steps[drv]; ok {
		return s, nil
	}
	if w.absent[drv] {
		return nil, nil
	}
	o := readSteps(w.c.txn).get(drv)
	if o == nil {
		if w.absent == nil {
			w.absent = map[string]bool{}
		}
		w.absent[drv] = true
		return nil, nil
	}
	s := o.step(true)
	w.steps[drv] = s
	return s, nil
}

func (w *work) mustStep(drv string) (*pb.Step, error) {
	s, err := w.step(drv)
	if err == nil && s == nil {
		err = fmt.Errorf("%w: step %s", ErrNotFound, drv)
	}
	return s, err
}

func (w *work) build(id uint64) (*pb.Build, error) {
	if b, ok := w.builds[id]; ok {
		return b, nil
	}
	o := readBuilds(w.c.txn).get(id)
	if o == nil {
		return nil, fmt.Errorf("%w: build %d", ErrNotFound, id)
	}
	b := proto.Clone(o).(*pb.Build)
	w.builds[id] = b
	return b, nil
}

// flush writes every working copy back, in key order.
func (w *work) flush() error {
	if len(w.steps) > 0 {
		t, err := writeSteps(w.c.txn)
		if err != nil {
			return err
		}
		for _, k := range sortedKeys(w.steps) {
			t.put(w.c.txn, w.steps[k], w.c.strs)
		}
	}
	if len(w.builds) > 0 {
		t, err := writeBuilds(w.c.txn)
		if err != nil {
			return err
		}
		for _, k := range sortedKeys(w.builds) {
			t.put(w.builds[k])
		}
	}
	return nil
}

func sortedKeys[K string | uint64, V any](m map[K]V) []K {
	ks := make([]K, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func terminal(s pb.StepState) bool {
	return s == pb.StepState_STEP_STATE_SUCCEEDED || s == pb.StepState_STEP_STATE_FAILED || s == pb.StepState_STEP_STATE_CANCELLED
}

// succeed marks a step built: dependents whose inputs are now all built
// become runnable, and builds of it finish.
func (w *work) succeed(s *pb.Step) error {
	s.State = pb.StepState_STEP_STATE_SUCCEEDED
	s.FinishedAt = w.c.now
	s.LastError = ""
	if err := w.dropLease(s); err != nil {
		return err
	}
	for _, d := range s.Dependents {
		ds, err := w.mustStep(d)
		if err != nil {
			return err
		}
		if ds.PendingInputs > 0 {
			ds.PendingInputs--
		}
		if ds.PendingInputs == 0 && ds.State == pb.StepState_STEP_STATE_WAITING {
			ds.State = pb.StepState_STEP_STATE_RUNNABLE
		}
	}
	return w.finishBuildsOf(s, 0, "")
}

// fail marks a step failed with a Hydra status; every step that depends on
// it (transitively) fails as "dependency failed" (2), and builds of them finish.
func (w *work) fail(s *pb.Step, status int32, reason string) error {
	s.State = pb.StepState_STEP_STATE_FAILED
	s.BuildStatus = status
	s.LastError = reason
	s.FinishedAt = w.c.now
	if err := w.dropLease(s); err != nil {
		return err
	}
	failed := []*pb.Step{s}
	for i := 0; i < len(failed); i++ {
		for _, d := range failed[i].Dependents {
			ds, err := w.mustStep(d)
			if err != nil {
				return err
			}
			if terminal(ds.State) {
				continue
			}
			if err := w.dropLease(ds); err != nil {
				return err
			}
			ds.State = pb.StepState_STEP_STATE_FAILED
			ds.BuildStatus = 2
			ds.LastError = "dependency failed: " + s.DrvPath
			ds.FinishedAt = w.c.now
			failed = append(failed, ds)
		}
	}
	for _, f := range failed {
		if err := w.finishBuildsOf(f, f.BuildStatus, f.LastError); err != nil {
			return err
		}
	}
	return nil
}

// finishBuildsOf finishes every queued build whose top-level derivation is s.
func (w *work) finishBuildsOf(s *pb.Step, status int32, reason string) error {
	var ids []uint64
	readBuilds(w.c.txn).ofDrv(s.DrvPath, func(b *pb.Build) bool {
		if b.State == pb.BuildState_BUILD_STATE_QUEUED {
			ids = append(ids, b.Id)
		}
		return true
	})
	for _, id := range ids {
		b, err := w.build(id)
		if err != nil {
			return err
		}
		if b.State != pb.BuildState_BUILD_STATE_QUEUED {
			continue
		}
		if status == 0 {
			b.Outputs = s.Outputs
		}
		if err := w.finishBuild(b, status, reason); err != nil {
			return err
		}
	}
	return nil
}

func (w *work) finishBuild(b *pb.Build, status int32, reason string) error {
	b.State = pb.BuildState_BUILD_STATE_FINISHED
	b.BuildStatus = status
	b.Reason = reason
	b.StopTime = w.c.now
	if b.StartTime == 0 {
		b.StartTime = w.c.now
	}
	b.StateHistory = append(b.StateHistory, &pb.StateChange{At: w.c.now, State: BuildStatusName(status), Reason: reason})
	return w.release(b.DrvPath)
}

// release drops one unfinished build's claim on the closure of root. Steps
// no unfinished build needs any more are cancelled (and their leases end).
func (w *work) release(root string) error {
	seen := map[string]bool{root: true}
	stack := []string{root}
	for len(stack) > 0 {
		drv := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		s, err := w.step(drv)
		if err != nil {
			return err
		}
		if s == nil || s.State == pb.StepState_STEP_STATE_SUCCEEDED {
			continue
		}
		if s.Refs > 0 {
			s.Refs--
		}
		if s.Refs == 0 && !terminal(s.State) {
			if err := w.dropLease(s); err != nil {
				return err
			}
			s.State = pb.StepState_STEP_STATE_CANCELLED
			s.FinishedAt = w.c.now
			s.LastError = "no unfinished build needs it"
		}
		for _, in := range s.InputDrvs {
			if !seen[in] {
				seen[in] = true
				stack = append(stack, in)
			}
		}
	}
	return nil
}

// dropLease deletes the active lease record of a step, if any, whatever
// state the caller already moved the step to. The step keeps lease_id so a
// repeated completion under it is recognised.
func (w *work) dropLease(s *pb.Step) error {
	if s.LeaseId == 0 {
		return nil
	}
	o, err := w.c.txn.First(tableLeases, "id", s.LeaseId)
	if err != nil || o == nil {
		return err
	}
	return w.c.txn.Delete(tableLeases, o)
}

// BuildStatusName names a Hydra buildstatus code.
func BuildStatusName(code int32) string {
	switch code {
	case 0:
		return "succeeded"
	case 1:
		return "failed"
	case 2:
		return "dependency failed"
	case 3, 9:
		return "aborted"
	case 4:
		return "cancelled"
	case 6:
		return "failed with output"
	case 7:
		return "timed out"
	case 10:
		return "log limit exceeded"
	case 11:
		return "output size limit exceeded"
	}
	return fmt.Sprintf("status %d", code)
}
