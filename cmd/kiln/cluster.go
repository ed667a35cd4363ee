package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// clusterFlags are the flags every `kiln cluster` subcommand takes.
type clusterFlags struct {
	coordinator string
	tokenFile   string
	timeout     time.Duration
}

func newClusterCmd() *cobra.Command {
	var f clusterFlags
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Inspect and change the coordinator cluster: members, removals, leadership",
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.coordinator, "coordinator", "", "URL of any coordinator")
	pf.StringVar(&f.tokenFile, "token-file", "", "file holding the admin token (required by remove and transfer-leadership)")
	pf.DurationVar(&f.timeout, "timeout", 30*time.Second, "give up after this long")

	members := &cobra.Command{
		Use:   "members",
		Short: "List the coordinators in the Raft configuration and who leads",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := f.client(false)
			if err != nil {
				return err
			}
			resp, err := client.Members(cmd.Context(), connect.NewRequest(&kilnv1.MembersRequest{}))
			if err != nil {
				return fmt.Errorf("members: %w", err)
			}
			out := cmd.OutOrStdout()
			if err := printMembers(out, resp.Msg.Members); err != nil {
				return err
			}
			if len(resp.Msg.Gossip) > 0 {
				fmt.Fprintln(out)
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "GOSSIP MEMBER\tADDRESS\tSTATE\tROLE\tID")
				for _, g := range resp.Msg.Gossip {
					id := g.NodeId + g.AgentId
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", g.Name, g.Addr, g.State, g.Role, id)
				}
				if err := tw.Flush(); err != nil {
					return err
				}
			}
			leader := resp.Msg.LeaderId
			if leader == "" {
				leader = "none known"
			}
			_, err = fmt.Fprintf(out, "leader: %s, applied index (of the node asked): %d\n", leader, resp.Msg.AppliedIndex)
			return err
		},
	}

	remove := &cobra.Command{
		Use:   "remove NODE",
		Short: "Remove a coordinator from the Raft configuration (not the leader: transfer leadership first)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := f.client(true)
			if err != nil {
				return err
			}
			resp, err := client.RemoveServer(cmd.Context(), connect.NewRequest(&kilnv1.RemoveServerRequest{NodeId: args[0]}))
			if err != nil {
				return fmt.Errorf("remove %s: %w", args[0], err)
			}
			out := cmd.OutOrStdout()
			if _, err := fmt.Fprintf(out, "removed %s (leader: %s)\n", args[0], resp.Msg.LeaderId); err != nil {
				return err
			}
			return printMembers(out, resp.Msg.Members)
		},
	}

	var to string
	transfer := &cobra.Command{
		Use:   "transfer-leadership [--to NODE]",
		Short: "Hand leadership to another voter (one that answers ready, unless --to)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := f.client(true)
			if err != nil {
				return err
			}
			resp, err := client.TransferLeadership(cmd.Context(), connect.NewRequest(&kilnv1.TransferLeadershipRequest{ToNodeId: to}))
			if err != nil {
				return fmt.Errorf("transfer leadership: %w", err)
			}
			m := resp.Msg
			if m.OldLeaderId == m.LeaderId {
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s already leads\n", m.LeaderId)
			} else {
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "leadership moved from %s to %s\n", m.OldLeaderId, m.LeaderId)
			}
			return err
		},
	}
	transfer.Flags().StringVar(&to, "to", "", "the voter to hand leadership to")

	cmd.AddCommand(members, remove, transfer)
	return cmd
}

// client returns a ClusterService client for --coordinator, with the
// admin token when --token-file is given (required when needToken).
func (f *clusterFlags) client(needToken bool) (kilnv1connect.ClusterServiceClient, error) {
	if f.coordinator == "" {
		return nil, errors.New("--coordinator is required")
	}
	base := strings.TrimRight(f.coordinator, "/")
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	var opts []connect.ClientOption
	switch {
	case f.tokenFile != "":
		tok, err := readToken(f.tokenFile)
		if err != nil {
			return nil, err
		}
		opts = append(opts, connect.WithInterceptors(rpc.WithBearer(tok)))
	case needToken:
		return nil, errors.New("--token-file is required (the admin token)")
	}
	hc := &http.Client{Timeout: f.timeout}
	return kilnv1connect.NewClusterServiceClient(hc, base, opts...), nil
}

func printMembers(w io.Writer, ms []*kilnv1.Member) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRAFT ADDRESS\tHTTP ADDRESS\tVOTER\tLEADER")
	for _, m := range ms {
		httpAddr := m.HttpAddr
		if httpAddr == "" {
			httpAddr = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Id, m.RaftAddr, httpAddr, yesNo(m.Voter), yesNo(m.Leader))
	}
	return tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
