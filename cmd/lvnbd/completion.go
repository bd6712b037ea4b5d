package main

import (
	"github.com/spf13/cobra"
)

// newCompletionCmd replaces cobra's default completion command, so that it
// is documented like every other command (cobra adds its own only when
// Execute runs, which leaves it out of the man pages) and offers only the
// shells of a Linux system.
func newCompletionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print the shell completion script",
		Long: `Print the completion script of a shell, for lvnbd's commands and flags.
The Debian package installs them already, in
/usr/share/bash-completion/completions/lvnbd,
/usr/share/zsh/vendor-completions/_lvnbd and
/usr/share/fish/vendor_completions.d/lvnbd.fish.

To try one in the current shell:
  source <(lvnbd completion bash)
  source <(lvnbd completion zsh)
  lvnbd completion fish | source`,
		Example:               `  lvnbd completion bash > /etc/bash_completion.d/lvnbd`,
		ValidArgs:             []string{"bash", "zsh", "fish"},
		Args:                  cobra.MatchAll(cobra.ExactArgs(1), cobra.OnlyValidArgs),
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			root, w := cmd.Root(), cmd.OutOrStdout()
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(w, true)
			case "zsh":
				return root.GenZshCompletion(w)
			default:
				return root.GenFishCompletion(w, true)
			}
		},
	}
}
