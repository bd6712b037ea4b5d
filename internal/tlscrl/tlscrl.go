// Package tlscrl refuses a TLS peer whose verified certificate chain holds
// a certificate that a certificate revocation list (CRL) revokes: a dom0's
// client certificate taken back without re-keying the CA, or a storage
// box's server certificate. crypto/tls checks no CRL itself.
package tlscrl

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
)

// RevokedError is a peer certificate that a CRL revokes.
type RevokedError struct {
	Whose   string // "server" or "client"
	Subject string
	Serial  *big.Int
	CRL     string // the CRL file
}

func (e *RevokedError) Error() string {
	return fmt.Sprintf("the %s's certificate %q (serial %s) is revoked by the CRL %s", e.Whose, e.Subject, e.Serial, e.CRL)
}

// Load reads the CRLs in the PEM file path and returns a check for
// tls.Config.VerifyConnection that refuses a peer (whose: "server" or
// "client", for the error) any of them revokes.
func Load(path, whose string) (func(tls.ConnectionState) error, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the CRL: %w", err)
	}
	return Parse(path, data, whose)
}

// Parse is Load of data read from path. Every "X509 CRL" block counts
// (one per CA, as a chain's CAs each sign their own); other blocks are
// skipped, and a file without any is an error.
//
// A CRL counts for a certificate only if it was issued by that
// certificate's issuer and is signed by it, as the verified chain shows:
// a CRL from another CA cannot revoke certificates it did not sign. A CRL
// past its next update still counts: what it revokes stays revoked, and
// refusing every peer for a stale list would take every disk away.
func Parse(path string, data []byte, whose string) (func(tls.ConnectionState) error, error) {
	var lists []*x509.RevocationList
	for {
		var block *pem.Block
		if block, data = pem.Decode(data); block == nil {
			break
		}
		if block.Type != "X509 CRL" {
			continue
		}
		crl, err := x509.ParseRevocationList(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("reading the CRL %s: %w", path, err)
		}
		lists = append(lists, crl)
	}
	if len(lists) == 0 {
		return nil, fmt.Errorf("the CRL %s holds no PEM \"X509 CRL\"", path)
	}
	return func(cs tls.ConnectionState) error {
		for _, chain := range cs.VerifiedChains {
			for i, cert := range chain {
				for _, crl := range lists {
					if !bytes.Equal(cert.RawIssuer, crl.RawIssuer) || i+1 >= len(chain) || crl.CheckSignatureFrom(chain[i+1]) != nil {
						continue // not its issuer's list, or not signed by it
					}
					for _, r := range crl.RevokedCertificateEntries {
						if r.SerialNumber.Cmp(cert.SerialNumber) == 0 {
							return &RevokedError{Whose: whose, Subject: cert.Subject.String(), Serial: cert.SerialNumber, CRL: path}
						}
					}
				}
			}
		}
		return nil
	}, nil
}
