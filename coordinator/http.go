package coordinator

import (
	"io"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpcreflect"

	"github.com/kilnci/kiln/rpc"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
	"github.com/kilnci/kiln/web"
)

// writeProcedures are the Connect procedures that need the admin token.
var writeProcedures = map[string]bool{
	kilnv1connect.BuildServiceSubmitBuildProcedure:          true,
	kilnv1connect.BuildServiceCancelBuildProcedure:          true,
	kilnv1connect.ClusterServiceApplyProcedure:              true,
	kilnv1connect.ClusterServiceJoinProcedure:               true,
	kilnv1connect.ClusterServiceMembersProcedure:            false,
	kilnv1connect.ClusterServiceRemoveServerProcedure:       true,
	kilnv1connect.ClusterServiceTransferLeadershipProcedure: true,
}

func (c *Coordinator) newHTTPServer() *http.Server {
	mux := http.NewServeMux()
	opts := connect.WithHandlerOptions(
		connect.WithInterceptors(rpc.NewAuthInterceptor(rpc.RequireToken(c.cfg.AdminToken), func(p string) bool { return writeProcedures[p] })),
		connect.WithReadMaxBytes(int(c.cfg.MaxBodyBytes)),
		connect.WithSendMaxBytes(int(c.cfg.MaxBodyBytes)),
	)
	mux.Handle(kilnv1connect.NewBuildServiceHandler(buildService{c}, opts))
	mux.Handle(kilnv1connect.NewClusterServiceHandler(clusterService{c}, opts))
	// Agent messages are small or already compressed (zstd NAR chunks):
	// no gzip on them.
	agentPath, agentHandler := kilnv1connect.NewAgentServiceHandler(agentService{c},
		connect.WithReadMaxBytes(2<<20), connect.WithSendMaxBytes(int(c.cfg.MaxBodyBytes)), connect.WithCompressMinBytes(1<<30))
	mux.Handle(agentPath, idleReads(c.cfg.StreamIdleTimeout, c.leaderProxy(agentHandler)))
	reflector := grpcreflect.NewStaticReflector(kilnv1connect.BuildServiceName, kilnv1connect.ClusterServiceName, kilnv1connect.AgentServiceName)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))

	api := web.NewAPI(web.Config{
		Backend:      c,
		AdminAuth:    rpc.RequireTokenOrBasic(c.cfg.AdminToken),
		SessionKey:   sessionKey(c.cfg.AdminToken),
		MaxBodyBytes: c.cfg.MaxBodyBytes,
		MaxWait:      c.cfg.MaxReadWait,
		Routes: map[string]http.Handler{
			"GET /api/v1/cluster":            http.HandlerFunc(c.handleCluster),
			"GET /api/v1/cache/scrub":        http.HandlerFunc(c.handleScrub),
			"POST /api/v1/cache/scrub":       http.HandlerFunc(c.handleScrub),
			"GET /api/v1/leases/{lease}/log": c.leaderProxy(http.HandlerFunc(c.handleLiveLog)),
		},
	})
	// The REST API (Hydra's paths and /api/v1) answers everything the
	// routes below do not, unknown paths included (JSON 404).
	mux.Handle("/", api)
	mux.HandleFunc("GET /internal/v1/agents/live", c.handleLiveAgents)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		web.WriteJSON(w, http.StatusOK, map[string]any{"status": "ok", "node": c.id})
	})
	mux.HandleFunc("GET /ready", c.handleReady)
	mux.Handle("GET /metrics", c.metrics.handler())
	mux.Handle("/cache/", c.cacheHandler)
	mux.HandleFunc("/internal/v1/blobs/{name}", c.handleInternalBlob)
	mux.HandleFunc("POST /internal/v1/blobs", c.handleInternalBlobUpload)

	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           cacheFirst(c.cacheHandler, mux),
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		// No WriteTimeout: it would cut long-polls and streams short.
	}
}

// Ready reports whether a leader is known and this node has applied what
// was committed when it first saw one, with the reason when not.
func (c *Coordinator) Ready() (bool, string) {
	_, leader := c.raft.LeaderWithID()
	if leader == "" {
		return false, "no leader known"
	}
	c.noteLeaderContact()
	target := c.readyIndex.Load()
	if target == 0 {
		return false, "waiting for the first contact with a leader"
	}
	if applied := c.fsm.AppliedIndex(); applied < target {
		return false, "catching up with the log"
	}
	return true, ""
}

func (c *Coordinator) handleReady(w http.ResponseWriter, r *http.Request) {
	ok, reason := c.Ready()
	body := map[string]any{"ready": ok, "applied_index": c.fsm.AppliedIndex()}
	status := http.StatusOK
	if !ok {
		body["reason"] = reason
		status = http.StatusServiceUnavailable
	}
	web.WriteJSON(w, status, body)
}

type clusterMember struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr,omitempty"`
	// GossipAddr is the member's address in the gossip pool, if it has one.
	GossipAddr string `json:"gossip_addr,omitempty"`
	Voter      bool   `json:"voter"`
	Leader     bool   `json:"leader"`
}

func (c *Coordinator) handleCluster(w http.ResponseWriter, r *http.Request) {
	ms, leader, err := c.members()
	if err != nil {
		web.WriteError(w, err)
		return
	}
	out := struct {
		Node         string          `json:"node"`
		State        string          `json:"state"`
		Leader       string          `json:"leader"`
		AppliedIndex uint64          `json:"applied_index"`
		CommitIndex  uint64          `json:"commit_index"`
		Members      []clusterMember `json:"members"`
	}{Node: c.id, State: c.raft.State().String(), Leader: leader, AppliedIndex: c.fsm.AppliedIndex(), CommitIndex: c.raft.CommitIndex(), Members: []clusterMember{}}
	for _, m := range ms {
		out.Members = append(out.Members, clusterMember{ID: m.Id, RaftAddr: m.RaftAddr, HTTPAddr: m.HttpAddr, GossipAddr: m.GossipAddr, Voter: m.Voter, Leader: m.Leader})
	}
	web.WriteJSON(w, http.StatusOK, out)
}

// cacheFirst sends /cache/ requests straight to the cache handler, the
// hottest path (Nix clients ask for narinfo by the thousand), without the
// mux's pattern matching. The cache's router is strict about its paths.
func cacheFirst(cache http.Handler, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/cache/") {
			cache.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// idleReads bounds how long a request body may stall: before each read of
// the body the connection's read deadline is pushed to now+idle, so an
// upload or log stream that stops sending (a stuck or malicious agent)
// ends with an error instead of holding its handler forever, while a
// long, steady stream is never cut. The wrapped body goes to a shallow
// copy of the request: the server looks at its own request's body after
// the handler, and a body the handler left unread (an upload refused at
// its header) must be seen as closed early, so that the connection is
// closed only after a pause that lets the client read the answer, not at
// once (the client would see the connection reset instead).
func idleReads(idle time.Duration, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if rc.SetReadDeadline(time.Now().Add(idle)) == nil {
			body := &idleBody{ReadCloser: r.Body, rc: rc, idle: idle}
			r = r.WithContext(r.Context())
			r.Body = body
		}
		next.ServeHTTP(w, r)
	})
}

type idleBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	idle time.Duration
}

func (b *idleBody) Read(p []byte) (int, error) {
	_ = b.rc.SetReadDeadline(time.Now().Add(b.idle))
	return b.ReadCloser.Read(p)
}
