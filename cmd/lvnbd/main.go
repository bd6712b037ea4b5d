// Command lvnbd is a network block storage server and client for Linux
// clusters: it exports LVM volumes and files over NBD and attaches them as
// kernel block devices. See `lvnbd --help`.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// SIGINT and SIGTERM cancel the context: every command treats that as
	// a normal, orderly exit.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd := newRootCmd(os.Stdout, os.Stderr)
	if err := cmd.ExecuteContext(ctx); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code)) // the command already said why
		}
		fmt.Fprintln(os.Stderr, "lvnbd:", err)
		os.Exit(1)
	}
}

// exitCode is returned by commands whose exit status carries meaning beyond
// failure (the fence agent's "fenced" is 2) and who printed their own message.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }
