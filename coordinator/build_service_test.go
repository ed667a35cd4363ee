package coordinator

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"

	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

func h2cClient() *http.Client {
	return &http.Client{Transport: &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}}
}

// TestBuildServiceThroughFollower drives kiln.v1.BuildService on a
// follower with the Connect protocol over HTTP/1.1 and with gRPC over h2c.
func TestBuildServiceThroughFollower(t *testing.T) {
	tc := startCluster(t, 3)
	_, fol := tc.follower()
	clients := []struct {
		name   string
		client kilnv1connect.BuildServiceClient
	}{
		{"connect over HTTP/1.1", kilnv1connect.NewBuildServiceClient(http.DefaultClient, "http://"+fol.HTTPAddr(), connect.WithInterceptors(rpc.WithBearer(testToken)))},
		{"gRPC over h2c", kilnv1connect.NewBuildServiceClient(h2cClient(), "http://"+fol.HTTPAddr(), connect.WithGRPC(), connect.WithInterceptors(rpc.WithBearer(testToken)))},
	}
	for i, cl := range clients {
		t.Run(cl.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			m := submitMsg(100 + i)
			req := &kilnv1.SubmitBuildRequest{DrvPath: m.Build.DrvPath, Job: "hello"}
			for _, n := range m.Graph {
				d := &kilnv1.Derivation{DrvPath: n.DrvPath, System: n.System, InputDrvs: n.InputDrvs}
				for _, o := range n.Outputs {
					d.Outputs = append(d.Outputs, &kilnv1.Output{Name: o.Name, Path: o.Path})
				}
				req.Graph = append(req.Graph, d)
			}
			sub, err := cl.client.SubmitBuild(ctx, connect.NewRequest(req))
			if err != nil {
				t.Fatal(err)
			}
			id := sub.Msg.Build.Id
			got, err := cl.client.GetBuild(ctx, connect.NewRequest(&kilnv1.GetBuildRequest{Id: id}))
			if err != nil || got.Msg.Build.DrvPath != req.DrvPath || got.Msg.Build.Finished {
				t.Fatalf("GetBuild(%d) = %v, %v", id, got, err)
			}
			list, err := cl.client.ListBuilds(ctx, connect.NewRequest(&kilnv1.ListBuildsRequest{Job: "hello", State: "queued"}))
			if err != nil || list.Msg.Total < 1 {
				t.Fatalf("ListBuilds = %v, %v", list, err)
			}
			c, err := cl.client.CancelBuild(ctx, connect.NewRequest(&kilnv1.CancelBuildRequest{Id: id}))
			if err != nil || !c.Msg.Build.Finished || c.Msg.Build.BuildStatus != 4 {
				t.Fatalf("CancelBuild = %v, %v", c, err)
			}
			_, err = cl.client.CancelBuild(ctx, connect.NewRequest(&kilnv1.CancelBuildRequest{Id: id}))
			if code := connect.CodeOf(err); code != connect.CodeAlreadyExists {
				t.Fatalf("second cancel: code %v (%v), want %v", code, err, connect.CodeAlreadyExists)
			}
			_, err = cl.client.GetBuild(ctx, connect.NewRequest(&kilnv1.GetBuildRequest{Id: 987654}))
			if code := connect.CodeOf(err); code != connect.CodeNotFound {
				t.Fatalf("unknown build: code %v, want NotFound", code)
			}
		})
	}
	// Writes without the token are refused and change nothing.
	anon := kilnv1connect.NewBuildServiceClient(http.DefaultClient, "http://"+fol.HTTPAddr())
	before := fol.AppliedIndex()
	_, err := anon.SubmitBuild(context.Background(), connect.NewRequest(&kilnv1.SubmitBuildRequest{DrvPath: submitMsg(1).Build.DrvPath}))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeUnauthenticated {
		t.Fatalf("anonymous submit: %v, want Unauthenticated", err)
	}
	if fol.AppliedIndex() != before {
		t.Fatalf("anonymous submit moved the applied index")
	}
}
