package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/nbd"
)

// mapChunk is how much of the export one --map BLOCK_STATUS request asks about.
const mapChunk = 1 << 30

func newInfoCmd() *cobra.Command {
	var (
		list, allocMap, asJSON bool
		timeout                time.Duration
		tlsFiles               clientTLS
	)
	cmd := &cobra.Command{
		Use:   "info URI",
		Short: "Show what an NBD export offers",
		Long: `Show what an NBD export offers: its size, transmission flags, block size
constraints, metadata contexts and description, asked of the server without
connecting to the export (NBD_OPT_INFO).

--list lists the server's exports instead; --map prints the export's
allocation map (BLOCK_STATUS over base:allocation). A size that is not a
multiple of the server's minimum block size leaves a tail no request may ask
about: the map ends before it and says how long it is. --json prints one JSON
object (an array with --list) with stable snake_case keys.

URI is nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH, or their
TLS forms.

` + clientTLSHelp,
		Example: `  lvnbd info nbd://storage-a/vm1
  lvnbd info --list nbd://storage-a
  lvnbd info --map --json nbd+unix:///vm1?socket=/run/lvnbd.sock
  lvnbd info --tls-ca /etc/lvnbd/ca.crt nbds://storage-a/vm1
  lvnbd info 'nbds://storage-a/vm1?tls-certificates=/etc/lvnbd/pki'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if list && allocMap {
				return errors.New("--list and --map cannot be combined")
			}
			opts, err := tlsFiles.options(cmd.ErrOrStderr(), args[0])
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			w := cmd.OutOrStdout()
			switch {
			case list:
				err = infoList(ctx, w, args[0], opts, asJSON)
			case allocMap:
				err = infoMap(ctx, w, args[0], opts, asJSON)
			default:
				err = infoExport(ctx, w, args[0], opts, asJSON)
			}
			return dialHint(err)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&list, "list", false, "list the server's exports")
	f.BoolVar(&allocMap, "map", false, "print the allocation map of the export")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "give up after this long (0: never)")
	tlsFiles.addFlags(f)
	return cmd
}

// exportJSON is the --json form of an export's information.
type exportJSON struct {
	URI                  string        `json:"uri"`
	ExportName           string        `json:"export_name"`
	Description          string        `json:"description"`
	Size                 uint64        `json:"size"`
	TransmissionFlags    []string      `json:"transmission_flags"`
	TransmissionFlagsRaw uint16        `json:"transmission_flags_raw"`
	ReadOnly             bool          `json:"read_only"`
	CanMultiConn         bool          `json:"can_multi_conn"`
	BlockSize            blockSizeJSON `json:"block_size"`
	MetaContexts         []string      `json:"meta_contexts"`
	StructuredReplies    bool          `json:"structured_replies"`
	TLS                  bool          `json:"tls"`
}

type blockSizeJSON struct {
	Minimum        uint32 `json:"minimum"`
	Preferred      uint32 `json:"preferred"`
	MaximumPayload uint32 `json:"maximum_payload"`
	Advertised     bool   `json:"advertised"`
}

func infoExport(ctx context.Context, w io.Writer, uri string, opts *client.Options, asJSON bool) error {
	info, err := client.Info(ctx, uri, opts)
	if err != nil {
		return err
	}
	u, _ := client.ParseURI(uri) // Info has parsed it already
	u.Export = info.Name
	j := exportJSON{
		URI:                  u.String(),
		ExportName:           info.Name,
		Description:          info.Description,
		Size:                 info.Size,
		TransmissionFlags:    flagNames(info.Flags),
		TransmissionFlagsRaw: uint16(info.Flags),
		ReadOnly:             info.ReadOnly(),
		CanMultiConn:         info.MultiConn(),
		BlockSize: blockSizeJSON{Minimum: info.BlockSizes.Minimum, Preferred: info.BlockSizes.Preferred,
			MaximumPayload: info.BlockSizes.MaxPayload, Advertised: info.BlockSizesAdvertised},
		MetaContexts:      []string{},
		StructuredReplies: info.StructuredReplies,
		TLS:               info.TLS,
	}
	for _, m := range info.MetaContexts {
		j.MetaContexts = append(j.MetaContexts, m.Name)
	}
	if asJSON {
		return writeJSON(w, j)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "export:\t%s\n", showName(j.ExportName))
	fmt.Fprintf(tw, "uri:\t%s\n", j.URI)
	fmt.Fprintf(tw, "description:\t%s\n", orNone(j.Description))
	fmt.Fprintf(tw, "size:\t%d (%s)\n", j.Size, humanize.IBytes(j.Size))
	fmt.Fprintf(tw, "flags:\t%s\n", strings.Join(j.TransmissionFlags, " "))
	fmt.Fprintf(tw, "read-only:\t%s\n", yesNo(j.ReadOnly))
	bs := fmt.Sprintf("minimum %d, preferred %d, maximum payload %d (%s)", j.BlockSize.Minimum,
		j.BlockSize.Preferred, j.BlockSize.MaximumPayload, humanize.IBytes(uint64(j.BlockSize.MaximumPayload)))
	if !j.BlockSize.Advertised {
		bs = "not advertised; protocol defaults: " + bs
	}
	fmt.Fprintf(tw, "block sizes:\t%s\n", bs)
	fmt.Fprintf(tw, "meta contexts:\t%s\n", orNone(strings.Join(j.MetaContexts, " ")))
	fmt.Fprintf(tw, "structured replies:\t%s\n", yesNo(j.StructuredReplies))
	fmt.Fprintf(tw, "tls:\t%s\n", yesNo(j.TLS))
	return tw.Flush()
}

// flagNames names every set transmission flag; unknown bits appear in hex.
func flagNames(f nbd.TransmissionFlags) []string {
	if f == 0 {
		return []string{}
	}
	return strings.Split(f.String(), "|")
}

type listEntryJSON struct {
	Name        string `json:"name"`
	Description string `json:"description"`
}

func infoList(ctx context.Context, w io.Writer, uri string, opts *client.Options, asJSON bool) error {
	entries, err := client.List(ctx, uri, opts)
	if err != nil {
		return err
	}
	out := make([]listEntryJSON, 0, len(entries))
	for _, e := range entries {
		out = append(out, listEntryJSON{Name: e.Name, Description: e.Description})
	}
	if asJSON {
		return writeJSON(w, out)
	}
	if len(out) == 0 {
		fmt.Fprintln(w, "no exports")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDESCRIPTION")
	for _, e := range out {
		fmt.Fprintf(tw, "%s\t%s\n", showName(e.Name), e.Description)
	}
	return tw.Flush()
}

type mapJSON struct {
	URI        string       `json:"uri"`
	ExportName string       `json:"export_name"`
	Size       uint64       `json:"size"`
	Map        []extentJSON `json:"map"`
	// Unmapped is the length of the export's tail past the last multiple
	// of the minimum block size, which no request may ask about.
	Unmapped uint64 `json:"unmapped,omitempty"`
}

type extentJSON struct {
	Offset      uint64 `json:"offset"`
	Length      uint64 `json:"length"`
	Flags       uint32 `json:"flags"`
	Description string `json:"description"`
}

func infoMap(ctx context.Context, w io.Writer, uri string, opts *client.Options, asJSON bool) error {
	c, err := client.Dial(ctx, uri, opts)
	if err != nil {
		return err
	}
	defer c.Close()
	info := c.Export()
	// The spec bounds every request to multiples of the minimum block
	// size; a size that is not one leaves a tail out of reach.
	align := uint64(max(info.BlockSizes.Minimum, 1))
	unmapped := info.Size % align
	extents, err := allocationMap(ctx, c, info.Size-unmapped)
	if err != nil {
		if errors.Is(err, client.ErrUnsupported) {
			return fmt.Errorf("export %q cannot be mapped: its server offers no base:allocation block status", info.Name)
		}
		return err
	}
	if asJSON {
		u, _ := client.ParseURI(uri)
		return writeJSON(w, mapJSON{URI: u.String(), ExportName: info.Name, Size: info.Size, Map: extents, Unmapped: unmapped})
	}
	// Numbers right-aligned, the description left-aligned after them.
	ow, lw := len("OFFSET"), len("LENGTH")
	for _, e := range extents {
		ow = max(ow, len(strconv.FormatUint(e.Offset, 10)))
		lw = max(lw, len(strconv.FormatUint(e.Length, 10)))
	}
	fmt.Fprintf(w, "%*s  %*s  FLAGS  DESCRIPTION\n", ow, "OFFSET", lw, "LENGTH")
	for _, e := range extents {
		fmt.Fprintf(w, "%*d  %*d  %5d  %s\n", ow, e.Offset, lw, e.Length, e.Flags, e.Description)
	}
	if unmapped > 0 {
		fmt.Fprintf(w, "(not mapped: the last %d bytes, past the last multiple of the server's minimum block size of %d bytes, which no request may ask about)\n",
			unmapped, align)
	}
	return nil
}

// allocationMap asks for block status over the export's first size bytes, a
// chunk at a time, merging neighbours with equal flags. size must be a
// multiple of the minimum block size, as mapChunk is.
func allocationMap(ctx context.Context, c *client.Conn, size uint64) ([]extentJSON, error) {
	out := []extentJSON{}
	for off := uint64(0); off < size; {
		ext, err := c.BlockStatus(ctx, int64(off), int64(min(size-off, mapChunk)), 0)
		if err != nil {
			return nil, err
		}
		for _, e := range ext {
			n := min(uint64(e.Length), size-off) // the last may run past the end
			if last := len(out) - 1; last >= 0 && out[last].Flags == e.Flags {
				out[last].Length += n
			} else {
				out = append(out, extentJSON{Offset: off, Length: n, Flags: e.Flags, Description: stateNames(e.Flags)})
			}
			off += n
			if off >= size {
				break
			}
		}
	}
	return out, nil
}

// stateNames describes base:allocation flags.
func stateNames(f uint32) string {
	var names []string
	if f&nbd.StateHole != 0 {
		names = append(names, "hole")
	}
	if f&nbd.StateZero != 0 {
		names = append(names, "zero")
	}
	if rest := f &^ (nbd.StateHole | nbd.StateZero); rest != 0 {
		names = append(names, fmt.Sprintf("%#x", rest))
	}
	if len(names) == 0 {
		return "data"
	}
	return strings.Join(names, ",")
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// showName is an export name as text output shows it: quoted when it is
// empty, or when it holds what a terminal would act on or could not show
// (control characters, invalid UTF-8). The names come from the server, which
// must not be able to write escape sequences to an admin's terminal.
func showName(s string) string {
	if s == "" || !utf8.ValidString(s) || strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
