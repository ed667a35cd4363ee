package coordinator

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/web"
)

// This file is the coordinator's side of web.Backend: what the REST API
// needs beyond the replicated state.

// WaitApplied returns once this node has applied index, or ctx ends.
func (c *Coordinator) WaitApplied(ctx context.Context, index uint64) error {
	return c.fsm.waitApplied(ctx, index)
}

// CatchUp waits until this node has applied everything the leader had
// committed when asked (a read barrier, as Raft's ReadIndex): a follower
// learns of new commits only with the next append, so its own commit
// index is not enough.
func (c *Coordinator) CatchUp(ctx context.Context) error {
	if c.IsLeader() {
		return c.fsm.waitApplied(ctx, c.raft.CommitIndex())
	}
	addr, err := c.leaderHTTPAddr()
	if err != nil {
		return err
	}
	v, err := c.peerCluster(ctx, addr)
	if err != nil {
		return fmt.Errorf("%w: the leader did not say its commit index: %v", raftfsm.ErrUnavailable, err)
	}
	return c.fsm.waitApplied(ctx, v.CommitIndex)
}

// ServeLog writes a stored build log from this node's blob store.
func (c *Coordinator) ServeLog(w http.ResponseWriter, r *http.Request, rec *pb.LogRecord) {
	c.cacheHandler.ServeLogRecord(w, r, rec)
}

// sessionKey derives the key that signs login sessions from the admin
// token, which every coordinator shares: a session works on any node and
// rotating the token logs everyone out.
func sessionKey(adminToken string) []byte {
	if adminToken == "" {
		return nil
	}
	m := hmac.New(sha256.New, []byte(adminToken))
	m.Write([]byte("kiln session key v1"))
	return m.Sum(nil)
}

// liveAgents are the agents the leader heard from within a lease TTL.
func (c *Coordinator) liveAgentsHere() map[string]time.Time {
	live := c.live()
	if live == nil {
		return nil
	}
	cutoff := time.Now().Add(-c.cfg.LeaseTTL)
	out := map[string]time.Time{}
	live.mu.Lock()
	defer live.mu.Unlock()
	for id, t := range live.agents {
		if t.After(cutoff) {
			out[id] = t
		}
	}
	return out
}

// LiveAgents answers from the leader's memory; a follower asks the leader.
func (c *Coordinator) LiveAgents(ctx context.Context) (map[string]time.Time, bool) {
	if c.IsLeader() {
		if m := c.liveAgentsHere(); m != nil {
			return m, true
		}
		return nil, false
	}
	addr, err := c.leaderHTTPAddr()
	if err != nil {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var out map[string]time.Time
	if err := c.getPeerJSON(ctx, addr, "/internal/v1/agents/live", 4<<20, &out); err != nil {
		return nil, false
	}
	return out, true
}

// handleLiveAgents serves the leader's view of live agents to followers.
func (c *Coordinator) handleLiveAgents(w http.ResponseWriter, r *http.Request) {
	if err := c.clusterAuth(r); err != nil {
		web.WriteError(w, err)
		return
	}
	m := c.liveAgentsHere()
	if m == nil || !c.IsLeader() {
		web.WriteError(w, fmt.Errorf("%w: not the leader", raftfsm.ErrUnavailable))
		return
	}
	web.WriteJSON(w, http.StatusOK, m)
}

// Leader is the ID of the leader this node knows ("" when none).
func (c *Coordinator) Leader() string {
	_, id := c.raft.LeaderWithID()
	return string(id)
}

// Cluster describes the coordinators (each asked for its applied index,
// in parallel, briefly) and the cache.
func (c *Coordinator) Cluster(ctx context.Context) web.ClusterStatus {
	out := web.ClusterStatus{Node: c.id, Coordinators: []web.CoordinatorStatus{}}
	_, leader := c.raft.LeaderWithID()
	out.Leader = string(leader)
	rd := c.fsm.Read()
	if n, narBytes, fileBytes, err := rd.CacheTotals(); err == nil {
		out.Cache = web.CacheStatus{NarInfos: n, NarBytes: narBytes, CompressedBytes: fileBytes}
	}
	if c.blobs != nil {
		c.blobs.mu.RLock()
		out.Cache.LocalBlobs = len(c.blobs.have)
		c.blobs.mu.RUnlock()
	}
	fut := c.raft.GetConfiguration()
	if fut.Error() != nil {
		return out
	}
	servers := fut.Configuration().Servers
	out.Coordinators = make([]web.CoordinatorStatus, len(servers))
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i, s := range servers {
		cs := &out.Coordinators[i]
		*cs = web.CoordinatorStatus{ID: string(s.ID), RaftAddr: string(s.Address), Voter: s.Suffrage == raft.Voter, Leader: s.ID == leader}
		if n, err := rd.Node(string(s.ID)); err == nil {
			cs.HTTPAddr = n.HttpAddr
		}
		if string(s.ID) == c.id {
			cs.RaftState, cs.AppliedIndex, cs.Reachable = c.raft.State().String(), c.fsm.AppliedIndex(), true
			continue
		}
		if cs.HTTPAddr == "" {
			continue
		}
		wg.Go(func() { c.askPeer(ctx, cs) })
	}
	wg.Wait()
	return out
}

// askPeer fills in a peer's Raft state and applied index from its /api/v1/cluster.
func (c *Coordinator) askPeer(ctx context.Context, cs *web.CoordinatorStatus) {
	if v, err := c.peerCluster(ctx, cs.HTTPAddr); err == nil {
		cs.RaftState, cs.AppliedIndex, cs.Reachable = v.State, v.AppliedIndex, true
	}
}

// peerView is what a coordinator's /api/v1/cluster says of its Raft node.
type peerView struct {
	State        string            `json:"state"`
	Leader       string            `json:"leader"`
	AppliedIndex uint64            `json:"applied_index"`
	CommitIndex  uint64            `json:"commit_index"`
	Members      []json.RawMessage `json:"members"`
}

// peerCluster reads another coordinator's /api/v1/cluster.
func (c *Coordinator) peerCluster(ctx context.Context, addr string) (*peerView, error) {
	var v peerView
	if err := c.getPeerJSON(ctx, addr, "/api/v1/cluster", 1<<20, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// getPeerJSON GETs path from the coordinator at addr (with the cluster
// credential) and decodes at most limit bytes of JSON into out.
func (c *Coordinator) getPeerJSON(ctx context.Context, addr, path string, limit int64, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.cfg.AdminToken)
	resp, err := c.blobClient.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w: %s%s answered %s", raftfsm.ErrUnavailable, addr, path, resp.Status)
	}
	return json.NewDecoder(http.MaxBytesReader(nil, resp.Body, limit)).Decode(out)
}
