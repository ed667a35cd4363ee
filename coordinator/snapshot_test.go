package coordinator

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestFollowerCatchesUpBySnapshot: a follower is down while the leader
// snapshots and compacts its log past what the follower has; restarted, it
// is sent the snapshot, restores it and ends with the leader's state.
func TestFollowerCatchesUpBySnapshot(t *testing.T) {
	tc := startCluster(t, 3)
	fi, fol := tc.follower()
	followerLast := fol.Raft().LastIndex()
	tc.stop(fi)
	_, leader := tc.leader(10 * time.Second)
	for i := 0; i < 200; i++ {
		if _, err := leader.SubmitBuild(context.Background(), submitMsg(5000+i)); err != nil {
			t.Fatal(err)
		}
	}
	// Snapshot on the leader and keep only a few entries after it.
	if err := leader.Raft().ReloadConfig(reloadTrailing(leader, 10)); err != nil {
		t.Fatal(err)
	}
	if err := leader.Raft().Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	first, err := leader.parts.store.FirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	if first <= followerLast+1 {
		t.Fatalf("log not compacted past the follower: leader's first index %d, follower's last %d", first, followerLast)
	}
	restarted := tc.restart(fi)
	target := leader.AppliedIndex()
	tc.waitFor(20*time.Second, "restarted follower catches up", func() bool { return restarted.AppliedIndex() >= target })
	if diff := cmp.Diff(dumpOf(t, leader), dumpOf(t, restarted), protocmpOpt()); diff != "" {
		t.Fatalf("state after InstallSnapshot differs (-leader +follower):\n%s", diff)
	}
	// It keeps following: a new write reaches it.
	b, err := leader.SubmitBuild(context.Background(), submitMsg(9999))
	if err != nil {
		t.Fatal(err)
	}
	tc.waitFor(10*time.Second, "new write replicated", func() bool { _, err := restarted.Read().Build(b.Id); return err == nil })
}

// TestWipedNodeRejoinsBySnapshot: a follower whose data dir is wiped is
// restarted with its old ID and addresses; it rejoins and is brought up
// to date by a snapshot, blobs included by the sync loop.
func TestWipedNodeRejoinsBySnapshot(t *testing.T) {
	tc := startCluster(t, 3)
	li, leader := tc.leader(10 * time.Second)
	fi := 1 // a follower that joined through node 0
	if li == 1 {
		fi = 2
	}
	for i := 0; i < 50; i++ {
		if _, err := leader.SubmitBuild(context.Background(), submitMsg(7000+i)); err != nil {
			t.Fatal(err)
		}
	}
	tc.stop(fi)
	if err := os.RemoveAll(tc.cfgs[fi].DataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(tc.cfgs[fi].DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := leader.Raft().ReloadConfig(reloadTrailing(leader, 10)); err != nil {
		t.Fatal(err)
	}
	if err := leader.Raft().Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	wiped := tc.restart(fi)
	target := leader.AppliedIndex()
	tc.waitFor(20*time.Second, "the wiped node catches up", func() bool { return wiped.AppliedIndex() >= target })
	if diff := cmp.Diff(dumpOf(t, leader), dumpOf(t, wiped), protocmpOpt()); diff != "" {
		t.Fatalf("state of the wiped node differs (-leader +wiped):\n%s", diff)
	}
	if wiped.Raft().LastIndex() < target {
		t.Errorf("wiped node's log ends at %d, before %d", wiped.Raft().LastIndex(), target)
	}
}
