{{/* Names, labels and the pieces every component's pod shares. */}}

{{- define "wifi-bridge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>. */}}
{{- define "wifi-bridge.component" -}}
{{- printf "%s-%s" (include "wifi-bridge.fullname" .root) .component -}}
{{- end -}}

{{- define "wifi-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "wifi-bridge.labels" -}}
{{ include "wifi-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "wifi-bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "wifi-bridge.required" -}}
{{- if not .Values.kafka.bootstrapServers -}}
{{- fail "kafka.bootstrapServers is required: the Kafka brokers, comma-separated host:port" -}}
{{- end -}}
{{- if gt (int .Values.kafka.minInsyncReplicas) (int .Values.kafka.replicationFactor) -}}
{{- fail (printf "kafka.minInsyncReplicas (%d) cannot exceed kafka.replicationFactor (%d): set both (a single broker needs 1 and 1)" (int .Values.kafka.minInsyncReplicas) (int .Values.kafka.replicationFactor)) -}}
{{- end -}}
{{- if and (hasPrefix "SASL_" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.existingSecret) -}}
{{- range $name := list "bridge" "pipeline" "crm" "analytics" -}}
{{- $component := get $.Values $name -}}
{{- if and $component.enabled (not (hasKey ($component.secretEnv | default dict) "KAFKA_SASL_PASSWORD")) -}}
{{- fail (printf "kafka.sasl.existingSecret is required with kafka.securityProtocol=%s: a Secret with the keys username and password (or KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD in %s.secretEnv)" $.Values.kafka.securityProtocol $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A Kubernetes quantity ("2Gi", "500M", "1073741824") in bytes; -1 for a spelling it does not
read (a fraction, an exponent), which the caller then leaves unchecked.
*/}}
{{- define "wifi-bridge.quantityBytes" -}}
{{- $text := toString . -}}
{{- $digits := regexFind "^[0-9]+" $text -}}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $unit := trimPrefix $digits $text -}}
{{- if and $digits (hasKey $units $unit) -}}
{{- mul (int64 $digits) (get $units $unit) -}}
{{- else -}}
-1
{{- end -}}
{{- end -}}

{{/* Kafka settings every service reads (KAFKA_*), and the SASL and TLS Secrets. */}}
{{- define "wifi-bridge.kafkaEnv" -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: KAFKA_CLIENT_ID
  value: {{ include "wifi-bridge.fullname" . | quote }}
- name: KAFKA_CREATE_TOPICS
  value: {{ .Values.kafka.createTopics | quote }}
- name: KAFKA_TOPIC_PARTITIONS
  value: {{ include "wifi-bridge.envValue" .Values.kafka.topicPartitions }}
- name: KAFKA_REPLICATION_FACTOR
  value: {{ include "wifi-bridge.envValue" .Values.kafka.replicationFactor }}
- name: KAFKA_MIN_INSYNC_REPLICAS
  value: {{ include "wifi-bridge.envValue" .Values.kafka.minInsyncReplicas }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- name: KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
{{- if .Values.kafka.sasl.existingSecret }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ .Values.kafka.sasl.existingSecret | quote }}, key: username}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.kafka.sasl.existingSecret | quote }}, key: password}
{{- end }}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
- name: KAFKA_SSL_CAFILE
  value: /etc/wifi-bridge/kafka-tls/ca.crt
{{- if .Values.kafka.tls.clientCertificate }}
- name: KAFKA_SSL_CERTFILE
  value: /etc/wifi-bridge/kafka-tls/tls.crt
- name: KAFKA_SSL_KEYFILE
  value: /etc/wifi-bridge/kafka-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/*
An environment value, quoted. Helm reads every YAML number as a float, and a large one would be
written in exponent form (1.073741824e+09), which the services refuse: whole numbers are written
as integers.
*/}}
{{- define "wifi-bridge.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{ int64 . | quote }}
{{- else -}}
{{ . | quote }}
{{- end -}}
{{- end -}}

{{/* A component's own `env` (plain) and `secretEnv` (NAME: {secret, key}) pass-through. */}}
{{- define "wifi-bridge.extraEnv" -}}
{{- range $name, $value := .env }}
- name: {{ $name }}
  value: {{ include "wifi-bridge.envValue" $value }}
{{- end }}
{{- range $name, $ref := .secretEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef: {name: {{ required (printf "secretEnv.%s.secret is required" $name) $ref.secret | quote }}, key: {{ required (printf "secretEnv.%s.key is required" $name) $ref.key | quote }}}
{{- end }}
{{- end -}}

{{- define "wifi-bridge.kafkaVolumeMounts" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: /etc/wifi-bridge/kafka-tls
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "wifi-bridge.kafkaVolumes" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret | quote }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Pod-level fields every component shares: pull secrets, security context, scheduling. */}}
{{- define "wifi-bridge.podSpec" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "wifi-bridge.podMetadata" -}}
labels:
  {{- include "wifi-bridge.labels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A volumeClaimTemplate named "data". */}}
{{- define "wifi-bridge.dataClaim" -}}
- metadata:
    name: data
  spec:
    accessModes: [ReadWriteOnce]
    {{- with .storageClassName }}
    storageClassName: {{ . | quote }}
    {{- end }}
    resources:
      requests:
        storage: {{ .volumeSize | quote }}
{{- end -}}
