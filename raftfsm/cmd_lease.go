package raftfsm

import (
	"fmt"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// DefaultMaxTries bounds retries of transient failures.
const DefaultMaxTries = 5

func init() {
	register(pb.CommandType_COMMAND_TYPE_GRANT_LEASE, func() *pb.GrantLease { return &pb.GrantLease{} }, applyGrantLease)
	register(pb.CommandType_COMMAND_TYPE_COMPLETE_LEASE, func() *pb.CompleteLease { return &pb.CompleteLease{} }, applyCompleteLease)
	register(pb.CommandType_COMMAND_TYPE_EXPIRE_LEASE, func() *pb.ExpireLease { return &pb.ExpireLease{} }, applyExpireLease)
}

func applyGrantLease(c *applyCtx, m *pb.GrantLease) (uint64, error) {
	if m.AgentId == "" {
		return 0, fmt.Errorf("%w: lease without agent", ErrInvalid)
	}
	w := newWork(c)
	s, err := w.mustStep(m.DrvPath)
	if err != nil {
		return 0, err
	}
	if s.State != pb.StepState_STEP_STATE_RUNNABLE {
		return 0, fmt.Errorf("%w: step %s is %s, not runnable", ErrConflict, s.DrvPath, s.State)
	}
	if s.NotBefore > c.now {
		return 0, fmt.Errorf("%w: step %s is backing off until %d", ErrConflict, s.DrvPath, s.NotBefore)
	}
	id := LeaseID(c.index, c.pos)
	s.State = pb.StepState_STEP_STATE_LEASED
	s.LeaseId = id
	s.StartedAt = c.now
	s.Attempts = max(s.Attempts, s.Tries) + 1
	l := &pb.Lease{Id: id, AgentId: m.AgentId, DrvPath: s.DrvPath, GrantedAt: c.now, ExpiresAt: c.now + m.TtlSeconds, Attempt: s.Attempts}
	if err := c.txn.Insert(tableLeases, l); err != nil {
		return 0, err
	}
	return id, w.flush()
}

// leasedStep finds the step a lease fences. ok is false for a repeated
// completion of a step already finished under this very lease.
func leasedStep(w *work, id uint64) (s *pb.Step, ok bool, err error) {
	o := readSteps(w.c.txn).leased(id)
	if o == nil {
		return nil, false, fmt.Errorf("%w: lease %d is not current", ErrStaleLease, id)
	}
	s, err = w.mustStep(o.DrvPath)
	if err != nil {
		return nil, false, err
	}
	switch s.State {
	case pb.StepState_STEP_STATE_LEASED:
		return s, true, nil
	case pb.StepState_STEP_STATE_SUCCEEDED, pb.StepState_STEP_STATE_FAILED:
		return s, false, nil
	}
	return nil, false, fmt.Errorf("%w: lease %d: step %s is %s", ErrStaleLease, id, s.DrvPath, s.State)
}

func applyCompleteLease(c *applyCtx, m *pb.CompleteLease) (uint64, error) {
	w := newWork(c)
	s, current, err := leasedStep(w, m.LeaseId)
	if err != nil || !current {
		return m.LeaseId, err
	}
	switch m.Outcome {
	case pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED:
		err = w.succeed(s)
	case pb.LeaseOutcome_LEASE_OUTCOME_FAILED:
		err = w.fail(s, 1, m.Error)
	case pb.LeaseOutcome_LEASE_OUTCOME_TIMED_OUT:
		err = w.fail(s, 7, m.Error)
	case pb.LeaseOutcome_LEASE_OUTCOME_TRANSIENT:
		err = w.retry(s, m.Error, m.MaxTries, m.BackoffSeconds)
	case pb.LeaseOutcome_LEASE_OUTCOME_RELEASED:
		err = w.requeue(s, "handed back: "+m.Error)
	default:
		return 0, fmt.Errorf("%w: lease outcome %d", ErrInvalid, m.Outcome)
	}
	if err != nil {
		return 0, err
	}
	return m.LeaseId, w.flush()
}

func applyExpireLease(c *applyCtx, m *pb.ExpireLease) (uint64, error) {
	w := newWork(c)
	s, current, err := leasedStep(w, m.LeaseId)
	if err != nil {
		return 0, err
	}
	if !current {
		return 0, fmt.Errorf("%w: lease %d already completed", ErrStaleLease, m.LeaseId)
	}
	reason := m.Reason
	if reason == "" {
		reason = "lease expired"
	}
	if err := w.retry(s, reason, m.MaxTries, m.BackoffSeconds); err != nil {
		return 0, err
	}
	return m.LeaseId, w.flush()
}

// requeue makes a leased step runnable again at once, without counting a try.
func (w *work) requeue(s *pb.Step, reason string) error {
	if err := w.dropLease(s); err != nil {
		return err
	}
	s.State = pb.StepState_STEP_STATE_RUNNABLE
	s.LeaseId = 0
	s.LastError = reason
	return nil
}

// retry puts a step that failed for a transient reason back in the queue
// after a backoff, or aborts it (Hydra status 3) once it used its tries.
func (w *work) retry(s *pb.Step, reason string, maxTries uint32, backoff int64) error {
	if maxTries == 0 {
		maxTries = DefaultMaxTries
	}
	s.Tries++
	if s.Tries >= maxTries {
		return w.fail(s, 3, fmt.Sprintf("aborted after %d tries: %s", s.Tries, reason))
	}
	if err := w.dropLease(s); err != nil {
		return err
	}
	s.State = pb.StepState_STEP_STATE_RUNNABLE
	s.LeaseId = 0
	s.LastError = reason
	s.NotBefore = w.c.now + backoff
	return nil
}
