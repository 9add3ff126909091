{{/* Chart name. */}}
{{- define "testflinger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "testflinger.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "testflinger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "testflinger.labels" -}}
helm.sh/chart: {{ include "testflinger.chart" . }}
app.kubernetes.io/name: {{ include "testflinger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "testflinger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testflinger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "testflinger.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "testflinger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "testflinger.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The API's in-cluster URL. */}}
{{- define "testflinger.apiUrl" -}}
{{- printf "http://%s-api:%v" (include "testflinger.fullname" .) .Values.api.service.port }}
{{- end }}

{{/* AMQP_URI from the Secret. */}}
{{- define "testflinger.amqpEnv" -}}
- name: AMQP_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.amqp.existingSecret }}
      key: {{ .Values.amqp.secretKey }}
{{- end }}

{{/*
The Secret holding jwt-signing-key and admin-secret: the named one, else the generated one.
*/}}
{{- define "testflinger.authSecret" -}}
{{- default (printf "%s-auth" (include "testflinger.fullname" .)) .Values.auth.existingSecret -}}
{{- end }}

{{/* An agent's resources: <fullname>-agent-<name>. Takes (list $ agentName). */}}
{{- define "testflinger.agentFullname" -}}
{{- printf "%s-agent-%s" (include "testflinger.fullname" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Secret holding an agent's own broker password (key `password`). Takes (list $ agentName).
*/}}
{{- define "testflinger.agentBrokerSecret" -}}
{{- printf "%s-broker" (include "testflinger.agentFullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/*
Whether an agent connects as its own RabbitMQ user agent-<name> with the chart's Secret:
agentBroker.enabled and no amqpSecret of its own. Takes (list $ agent); "true" or "".
*/}}
{{- define "testflinger.agentOwnBrokerUser" -}}
{{- if and (index . 0).Values.agentBroker.enabled (not (index . 1).amqpSecret) }}true{{ end }}
{{- end }}

{{/*
The variable deploy/rabbitmq/users.sh reads an agent's password from: AGENT_PASSWORD_ and
the id upper-cased, anything but letters and digits as '_'. Takes the agent's name.
*/}}
{{- define "testflinger.agentPasswordVar" -}}
{{- printf "AGENT_PASSWORD_%s" (regexReplaceAll "[^A-Z0-9]" (upper .) "_") }}
{{- end }}
