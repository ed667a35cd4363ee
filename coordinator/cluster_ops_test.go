package coordinator

import (
	"context"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

func clusterClient(addr, token string) kilnv1connect.ClusterServiceClient {
	var opts []connect.ClientOption
	if token != "" {
		opts = append(opts, connect.WithInterceptors(rpc.WithBearer(token)))
	}
	return kilnv1connect.NewClusterServiceClient(&http.Client{Timeout: 15 * time.Second}, "http://"+addr, opts...)
}

// voterIDs lists the voters of c's latest Raft configuration, sorted.
func voterIDs(t *testing.T, c *Coordinator) []string {
	t.Helper()
	f := c.Raft().GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			ids = append(ids, string(s.ID))
		}
	}
	slices.Sort(ids)
	return ids
}

// nodeRecords lists the IDs of c's Node records, sorted.
func nodeRecords(t *testing.T, c *Coordinator) []string {
	t.Helper()
	ns, err := c.Read().Nodes()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, n := range ns {
		if !n.Removed { // tombstones of removed nodes are not members
			ids = append(ids, n.Id)
		}
	}
	slices.Sort(ids)
	return ids
}

// followers returns the indexes of the running nodes other than the leader.
func (tc *testCluster) followers(leader int) []int {
	var out []int
	for i, c := range tc.nodes {
		if i != leader && c != nil {
			out = append(out, i)
		}
	}
	return out
}

// mustSubmit commits a build through c and checks every node in tc sees it.
func mustSubmit(t *testing.T, tc *testCluster, c *Coordinator, i int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := c.SubmitBuild(ctx, submitMsg(i))
	if err != nil {
		t.Fatalf("write through %s: %v", c.ID(), err)
	}
	tc.waitFor(10*time.Second, "every node has the build", func() bool {
		for _, n := range tc.nodes {
			if n == nil {
				continue
			}
			if _, err := n.Read().Build(b.Id); err != nil {
				return false
			}
		}
		return true
	})
}

// TestClusterRemoveServer: bad removals (the leader, an unknown node, no
// id, no or a wrong token) are refused on the leader and via a follower
// and change nothing; removing a follower through the other follower
// leaves two voters, deletes its Node record everywhere and writes go on.
func TestClusterRemoveServer(t *testing.T) {
	tc := startCluster(t, 3)
	li, lead := tc.leader(10 * time.Second)
	fols := tc.followers(li)
	via, victim := tc.nodes[fols[0]], tc.nodes[fols[1]]
	victimID := victim.ID()
	votersBefore, nodesBefore := voterIDs(t, lead), nodeRecords(t, lead)

	refusals := []struct {
		name  string
		token string
		id    string
		code  connect.Code
	}{
		{"the leader itself", testToken, lead.ID(), connect.CodeAlreadyExists},
		{"an unknown node", testToken, "ghost", connect.CodeNotFound},
		{"no node id", testToken, "", connect.CodeInvalidArgument},
		{"without a token", "", victimID, connect.CodeUnauthenticated},
		{"with a wrong token", "not-the-admin-token-0123", victimID, connect.CodePermissionDenied},
	}
	for _, at := range []struct {
		name string
		c    *Coordinator
	}{{"on the leader", lead}, {"via a follower", via}} {
		for _, tt := range refusals {
			t.Run(at.name+"/"+tt.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_, err := clusterClient(at.c.HTTPAddr(), tt.token).RemoveServer(ctx, connect.NewRequest(&kilnv1.RemoveServerRequest{NodeId: tt.id}))
				if code := connect.CodeOf(err); code != tt.code {
					t.Fatalf("RemoveServer(%q) = %v (code %v), want code %v", tt.id, err, code, tt.code)
				}
			})
		}
	}
	if !lead.IsLeader() {
		t.Fatal("the leader lost leadership to refused removals")
	}
	for _, c := range tc.nodes {
		if got := voterIDs(t, c); !slices.Equal(got, votersBefore) {
			t.Fatalf("%s: voters %v after refused removals, want %v", c.ID(), got, votersBefore)
		}
		if got := nodeRecords(t, c); !slices.Equal(got, nodesBefore) {
			t.Fatalf("%s: node records %v after refused removals, want %v", c.ID(), got, nodesBefore)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := clusterClient(via.HTTPAddr(), testToken).RemoveServer(ctx, connect.NewRequest(&kilnv1.RemoveServerRequest{NodeId: victimID}))
	if err != nil {
		t.Fatalf("removing follower %s via %s: %v", victimID, via.ID(), err)
	}
	if resp.Msg.LeaderId != lead.ID() || len(resp.Msg.Members) != 2 {
		t.Fatalf("RemoveServer answered leader %q, members %v; want leader %s and 2 members", resp.Msg.LeaderId, resp.Msg.Members, lead.ID())
	}
	want := slices.DeleteFunc(slices.Clone(votersBefore), func(id string) bool { return id == victimID })
	remaining := []*Coordinator{lead, via}
	tc.waitFor(10*time.Second, "the remaining nodes see 2 voters and a tombstone for the removed node", func() bool {
		for _, c := range remaining {
			if !slices.Equal(voterIDs(t, c), want) || slices.Contains(nodeRecords(t, c), victimID) {
				return false
			}
			if n, err := c.Read().Node(victimID); err != nil || !n.Removed {
				return false
			}
		}
		return true
	})
	// The removed node no longer counts: stop it, then write through the
	// leader and through the remaining follower.
	tc.stop(slices.Index(tc.nodes, victim))
	mustSubmit(t, tc, lead, 1)
	mustSubmit(t, tc, via, 2)
	for _, c := range remaining {
		ms, leader, err := c.members()
		if err != nil || len(ms) != 2 || leader != lead.ID() {
			t.Fatalf("%s: members %v, leader %q, %v", c.ID(), ms, leader, err)
		}
	}

	// Removing it again: it is unknown now.
	_, err = clusterClient(via.HTTPAddr(), testToken).RemoveServer(ctx, connect.NewRequest(&kilnv1.RemoveServerRequest{NodeId: victimID}))
	if code := connect.CodeOf(err); code != connect.CodeNotFound {
		t.Fatalf("removing %s twice: %v (code %v), want NotFound", victimID, err, code)
	}
}

// TestClusterTransferLeadership: transfers without the admin token or to
// an unknown node are refused; a transfer asked of a follower (to any
// voter, to that follower, to the other one) or of the leader moves
// leadership where asked, and writes still work through the old leader.
func TestClusterTransferLeadership(t *testing.T) {
	tc := startCluster(t, 3)
	li, lead := tc.leader(10 * time.Second)
	via := tc.nodes[tc.followers(li)[0]]
	for _, tt := range []struct {
		name  string
		token string
		to    string
		code  connect.Code
	}{
		{"without a token", "", "", connect.CodeUnauthenticated},
		{"with a wrong token", "not-the-admin-token-0123", "", connect.CodePermissionDenied},
		{"to an unknown node", testToken, "ghost", connect.CodeNotFound},
	} {
		t.Run("refused "+tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := clusterClient(via.HTTPAddr(), tt.token).TransferLeadership(ctx, connect.NewRequest(&kilnv1.TransferLeadershipRequest{ToNodeId: tt.to}))
			if code := connect.CodeOf(err); code != tt.code {
				t.Fatalf("TransferLeadership(%q) = %v (code %v), want code %v", tt.to, err, code, tt.code)
			}
			if !lead.IsLeader() {
				t.Fatal("a refused transfer moved leadership")
			}
		})
	}

	// Each case picks, given the current leader and the follower asked,
	// the node to ask for ("" for any) and the node asked.
	cases := []struct {
		name string
		pick func(leader, fol, other *Coordinator) (to string, asked *Coordinator)
	}{
		{"via a follower, to any voter", func(_, fol, _ *Coordinator) (string, *Coordinator) { return "", fol }},
		{"via a follower, to that follower", func(_, fol, _ *Coordinator) (string, *Coordinator) { return fol.ID(), fol }},
		{"via a follower, to the other follower", func(_, fol, other *Coordinator) (string, *Coordinator) { return other.ID(), fol }},
		{"on the leader, to any voter", func(l, _, _ *Coordinator) (string, *Coordinator) { return "", l }},
		{"on the leader, to a named follower", func(l, fol, _ *Coordinator) (string, *Coordinator) { return fol.ID(), l }},
		{"to the current leader: nothing changes", func(l, fol, _ *Coordinator) (string, *Coordinator) { return l.ID(), fol }},
	}
	for n, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			li, old := tc.leader(10 * time.Second)
			fols := tc.followers(li)
			to, asked := tt.pick(old, tc.nodes[fols[0]], tc.nodes[fols[1]])
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			resp, err := clusterClient(asked.HTTPAddr(), testToken).TransferLeadership(ctx, connect.NewRequest(&kilnv1.TransferLeadershipRequest{ToNodeId: to}))
			if err != nil {
				t.Fatalf("TransferLeadership(%q) via %s: %v", to, asked.ID(), err)
			}
			took := time.Since(start)
			got := resp.Msg
			if got.OldLeaderId != old.ID() {
				t.Fatalf("old leader %q, want %s", got.OldLeaderId, old.ID())
			}
			switch {
			case to == old.ID():
				if got.LeaderId != old.ID() {
					t.Fatalf("asking for the current leader moved leadership to %q", got.LeaderId)
				}
			case to != "":
				if got.LeaderId != to {
					t.Fatalf("new leader %q, want %s", got.LeaderId, to)
				}
			case got.LeaderId == old.ID() || got.LeaderId == "":
				t.Fatalf("new leader %q, want another node than %s", got.LeaderId, old.ID())
			}
			_, now := tc.leader(5 * time.Second)
			if now.ID() != got.LeaderId {
				t.Fatalf("the ready leader is %s, the answer said %s", now.ID(), got.LeaderId)
			}
			t.Logf("%s -> %s in %v", got.OldLeaderId, got.LeaderId, took)
			mustSubmit(t, tc, old, 10+n)
		})
	}
}

// TestCloseHandsOffLeadership: closing the leader hands leadership to
// another voter, which leads as soon as Close returns (not an election
// timeout later), also when a follower is already down (a rolling restart
// of five: the successor must be a live voter, not the one Raft would
// pick on replication index alone); the hand-off is logged.
func TestCloseHandsOffLeadership(t *testing.T) {
	for _, tt := range []struct {
		name         string
		nodes        int
		followerDown bool
	}{
		{"three voters up", 3, false},
		{"five voters, one follower down", 5, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rec := &logRecorder{}
			tc := startCluster(t, tt.nodes, func(_ int, cfg *Config) { cfg.Logger = slog.New(rec.handler()) })
			li, old := tc.leader(10 * time.Second)
			oldID := old.ID()
			if tt.followerDown {
				tc.stop(tc.followers(li)[0])
			}
			start := time.Now()
			tc.stop(li)
			closeTook := time.Since(start)
			// Close waited until it heard from the new leader: one leads
			// already.
			var raftLeader string
			for _, c := range tc.nodes {
				if c != nil && c.Raft().State() == raft.Leader {
					raftLeader = c.ID()
				}
			}
			if raftLeader == "" {
				t.Fatalf("no node is the Raft leader right after Close (took %v) returned", closeTook)
			}
			_, now := tc.leader(2 * time.Second)
			if now.ID() == oldID || now.ID() != raftLeader {
				t.Fatalf("leader after Close: %s (Raft leader right after Close: %s, old: %s)", now.ID(), raftLeader, oldID)
			}
			handed := rec.find("handed off leadership", oldID)
			if len(handed) != 1 || handed[0]["to"] != now.ID() {
				t.Fatalf("hand-off log records of %s: %v; want one naming %s", oldID, handed, now.ID())
			}
			// Well under an election timeout (200 ms here) plus the
			// probe's bound: nothing timed out.
			if closeTook > probeTimeout {
				t.Fatalf("Close took %v", closeTook)
			}
			t.Logf("Close of leader %s took %v; %s took over", oldID, closeTook, now.ID())
			for i, c := range tc.nodes {
				if c != nil {
					mustSubmit(t, tc, c, i)
				}
			}
		})
	}
}

// TestClusterOpsSingleNode: the only voter cannot be removed, has nobody
// to hand leadership to, and closes without trying.
func TestClusterOpsSingleNode(t *testing.T) {
	rec := &logRecorder{}
	tc := startCluster(t, 1, func(_ int, cfg *Config) { cfg.Logger = slog.New(rec.handler()) })
	c := tc.nodes[0]
	cl := clusterClient(c.HTTPAddr(), testToken)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := cl.RemoveServer(ctx, connect.NewRequest(&kilnv1.RemoveServerRequest{NodeId: c.ID()}))
	if code := connect.CodeOf(err); code != connect.CodeAlreadyExists {
		t.Fatalf("removing the only voter: %v (code %v), want AlreadyExists", err, code)
	}
	_, err = cl.TransferLeadership(ctx, connect.NewRequest(&kilnv1.TransferLeadershipRequest{}))
	if code := connect.CodeOf(err); code != connect.CodeAlreadyExists {
		t.Fatalf("transfer with no other voter: %v (code %v), want AlreadyExists", err, code)
	}
	resp, err := cl.TransferLeadership(ctx, connect.NewRequest(&kilnv1.TransferLeadershipRequest{ToNodeId: c.ID()}))
	if err != nil || resp.Msg.LeaderId != c.ID() || resp.Msg.OldLeaderId != c.ID() {
		t.Fatalf("transfer to the leader itself: %v, %v", resp, err)
	}
	if got := voterIDs(t, c); !slices.Equal(got, []string{c.ID()}) || !c.IsLeader() {
		t.Fatalf("voters %v, leading %v after refused operations", got, c.IsLeader())
	}
	tc.stop(0)
	if len(rec.find("no leadership hand-off: this node is the only voter", c.ID())) != 1 || len(rec.find("handing off leadership before closing", c.ID())) != 0 {
		t.Fatal("Close of the only voter did not log that it skipped the hand-off")
	}
}

// logRecorder keeps the messages and attributes of every record at Info
// and above, shared by all the loggers derived from its handler.
type logRecorder struct {
	mu   sync.Mutex
	recs []map[string]string
}

func (r *logRecorder) handler() slog.Handler { return recHandler{r: r} }

// find returns the records with message msg logged by node.
func (r *logRecorder) find(msg, node string) []map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]string
	for _, rec := range r.recs {
		if rec["msg"] == msg && rec["node"] == node {
			out = append(out, rec)
		}
	}
	return out
}

type recHandler struct {
	r     *logRecorder
	attrs []slog.Attr
}

func (h recHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

func (h recHandler) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]string{"msg": rec.Message}
	for _, a := range h.attrs {
		m[a.Key] = a.Value.String()
	}
	rec.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	h.r.mu.Lock()
	h.r.recs = append(h.r.recs, m)
	h.r.mu.Unlock()
	return nil
}

func (h recHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return recHandler{r: h.r, attrs: append(slices.Clone(h.attrs), as...)}
}

func (h recHandler) WithGroup(string) slog.Handler { return h }
