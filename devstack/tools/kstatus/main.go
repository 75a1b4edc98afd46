// Command kstatus prints what sigs.k8s.io/cli-utils' kstatus library (the status logic Flux and
// kpt use) computes for each Kubernetes object given as JSON on stdin: one JSON line per object,
// {"name": ..., "status": "Current|InProgress|Failed|Terminating|NotFound|Unknown", "message": ...}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	decoder := json.NewDecoder(os.Stdin)
	encoder := json.NewEncoder(os.Stdout)
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err == io.EOF {
			return
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: reading an object:", err)
			os.Exit(2)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil { // keeps integers as int64, as the API machinery expects
			fmt.Fprintln(os.Stderr, "kstatus: decoding an object:", err)
			os.Exit(2)
		}
		computed, err := status.Compute(u)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", u.GetName(), err)
			os.Exit(1)
		}
		if err := encoder.Encode(result{u.GetName(), computed.Status.String(), computed.Message}); err != nil {
			os.Exit(2)
		}
	}
}
