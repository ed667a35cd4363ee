package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/kilnci/kiln/cache"
)

func newKeygenCmd() *cobra.Command {
	var secretFile, publicFile string
	cmd := &cobra.Command{
		Use:   "keygen NAME",
		Short: "Write a binary-cache signing key pair (the format of nix-store --generate-binary-cache-key)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if secretFile == "" {
				secretFile = name + ".sec"
			}
			if publicFile == "" {
				publicFile = name + ".pub"
			}
			pub, err := cache.WriteKeyFiles(name, secretFile, publicFile)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "secret key: %s (mode 0600)\npublic key: %s\n%s\n", secretFile, publicFile, pub)
			return nil
		},
	}
	cmd.Flags().StringVar(&secretFile, "secret-file", "", "where to write the secret key (default NAME.sec)")
	cmd.Flags().StringVar(&publicFile, "public-file", "", "where to write the public key (default NAME.pub)")
	return cmd
}
