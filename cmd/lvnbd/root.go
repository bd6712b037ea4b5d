package main

import (
	"io"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "lvnbd",
		Short: "Network block storage over NBD for Linux and Xen clusters",
		Long: `lvnbd exports block devices, files and LVM volumes over the NBD protocol,
and attaches them on hypervisor hosts as kernel block devices.

Storage box:   lvnbd serve --export vm1=/dev/vg0/vm1 --listen tcp://0.0.0.0:10809
Anywhere:      lvnbd info nbd://storage-a/vm1`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newServeCmd())
	root.AddCommand(newVolumeCmd())
	root.AddCommand(newSnapshotCmd())
	root.AddCommand(newInfoCmd())
	root.AddCommand(newStatusCmd())
	root.AddCommand(newRecoverCmd())
	root.AddCommand(newFenceCmd())
	root.AddCommand(newUnfenceCmd())
	root.AddCommand(newFenceAgentCmd())
	root.AddCommand(newBenchCmd())
	root.AddCommand(newAttachCmd(nil), newDetachCmd(nil), newListCmd(nil), newReconnectCmd(nil))
	root.AddCommand(newClientCmd(nil), newPairCmd())
	root.AddCommand(newGuestCmd(nil))
	root.AddCommand(newCompletionCmd(), newManCmd())
	return root
}
