package coordinator

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestGroupCommit checks how the proposer fills Raft entries: writers that
// write again as soon as they are answered share the next entry (the
// gathering wait), and a lone writer never waits for company.
func TestGroupCommit(t *testing.T) {
	for _, tc := range []struct {
		name            string
		writers, writes int
		gather          time.Duration
		// maxEntries is the most entries the writes may take.
		maxEntries int
	}{
		// A gathering wait of a minute would fail the test (each write
		// has 10 s): a lone writer's entries are never shared.
		{name: "a lone writer never waits", writers: 1, writes: 20, gather: time.Minute, maxEntries: 20},
		// Without the wait 8 writers settle into two alternating halves
		// (about 2 entries per round of writes); with it, each round is
		// one entry once everyone has written once.
		{name: "writers share the next entry", writers: 8, writes: 25, gather: time.Second, maxEntries: 25 + 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tcl := startCluster(t, 1, func(_ int, cfg *Config) { cfg.GroupCommitWait = tc.gather })
			_, l := tcl.leader(10 * time.Second)
			first := l.Raft().LastIndex()
			var wg sync.WaitGroup
			errs := make(chan error, tc.writers)
			for w := range tc.writers {
				wg.Go(func() {
					for i := range tc.writes {
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						_, err := l.SubmitBuild(ctx, benchSubmit(fmt.Sprintf("w%d-%d", w, i)))
						cancel()
						if err != nil {
							errs <- fmt.Errorf("writer %d, write %d: %w", w, i, err)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if got := int(l.Raft().LastIndex() - first); got > tc.maxEntries {
				t.Fatalf("%d writes took %d entries, want at most %d", tc.writers*tc.writes, got, tc.maxEntries)
			}
		})
	}
}
